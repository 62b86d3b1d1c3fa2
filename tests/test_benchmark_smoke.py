"""The speed benchmark runs end to end at its smoke size (its numbers are not asserted: speed
targets are checked by the benchmark itself, never by timed tests)."""

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / "layerwise_speed.py"


def test_benchmark_quick_writes_its_table(tmp_path):
    # A subprocess: the script forks its phases and expects a process that has run no torch kernel.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tables = list(tmp_path.glob("*.csv"))
    assert tables, f"no CSV written in {tmp_path}: {sorted(p.name for p in tmp_path.iterdir())}"
    table = pd.read_csv(tables[0])
    speeds = table[table["table"] == "speed"].set_index("measurement")["tokens_per_s"]
    for measurement in ("ours", "baseline", "roofline: matmuls"):
        matching = speeds[speeds.index.astype(str).str.startswith(measurement)]
        assert len(matching) >= 1 and (matching > 0).all(), measurement
    # The benchmark's own correctness check: ours gives SAE-Lens's dense-encode F on the same tokens.
    difference = re.search(
        r"largest relative difference of F over the hooks (\S+)", (tmp_path / "layerwise_speed_quick.md").read_text()
    )
    assert difference and float(difference.group(1)) < 1e-5
