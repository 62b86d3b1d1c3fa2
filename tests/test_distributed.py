"""The measurement under torchrun with 2 CPU processes equals the single-process one."""

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from distributed_setup import HOOKS, small_model, small_saes, small_windows

from lm_superposition.analyze import LayerwiseAnalyzer


def test_two_processes_give_the_single_process_result(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    worker = Path(__file__).parent / "distributed_worker.py"
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(worker), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    analyzer = LayerwiseAnalyzer(small_model(), small_saes(), model_name="small", batch_size=3, n_blocks=8)
    single = analyzer.run_seed(small_windows(), seed=1, token_budget=700, progress=False)
    single_table = analyzer.table([single]).set_index("hook")
    two_table = pd.read_csv(tmp_path / "table.csv").set_index("hook")
    two_budgets = torch.load(tmp_path / "budgets.pt", weights_only=True)

    for hook in HOOKS:
        # every token exactly once: the same count in every document block
        assert torch.equal(two_budgets[hook]["block_tokens"], single.budgets[hook].block_tokens)
        assert two_table.loc[hook, "tokens"] == 700
        for column in ("F", "psi", "entropy", "mean_l0"):
            assert abs(two_table.loc[hook, column] / single_table.loc[hook, column] - 1) <= 1e-9, column
        # SAE-Lens reduces each batch's squared norms in float32 before its float64 sums, so
        # a different batching agrees to float32 rounding only.
        assert abs(two_table.loc[hook, "variance_explained"] / single_table.loc[hook, "variance_explained"] - 1) <= 1e-6
