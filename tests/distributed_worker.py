"""Run under torchrun by test_distributed.py: the same small measurement on every process.

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py OUT_DIR

Rank 0 writes OUT_DIR/table.csv and OUT_DIR/budgets.pt (the merged accumulators).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

# torchrun puts this script's folder first on sys.path, so its sibling module imports plainly.
from distributed_setup import HOOKS, small_model, small_saes, small_windows

from lm_superposition.analyze import LayerwiseAnalyzer


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    analyzer = LayerwiseAnalyzer(small_model(), small_saes(), model_name="small", batch_size=3, n_blocks=8)
    state = analyzer.run_seed(small_windows(), seed=1, token_budget=700, progress=False)
    if dist.get_rank() == 0:
        analyzer.table([state]).to_csv(out_dir / "table.csv", index=False)
        torch.save({hook: state.budgets[hook].state_dict() for hook in HOOKS}, out_dir / "budgets.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
