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


BENCHMARKS = SCRIPT.parent
PEERS = BENCHMARKS.parent.parent / "results" / "benchmarks" / "peers"


def test_sae_step_profile_runs_at_a_tiny_size(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sae_step_profile.py"), "--d-in", "16", "--d-sae", "64", "--k", "4",
         "--tokens", "32", "--hooks", "3", "--repeats", "2", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=BENCHMARKS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in (tmp_path / "sae_step_profile.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 8  # header and the 8 contenders


def test_training_step_parts_agree_at_a_tiny_size(tmp_path):
    """The script exits 1 unless both W gradients agree and every top-k gives the same latents."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "training_step_parts.py"), "--d-in", "16", "--d-sae", "128", "--k", "4",
         "--tokens", "40", "--dead", "0", "30", "--repeats", "2", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=BENCHMARKS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in (tmp_path / "training_step_parts.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3 + 2 * 2 + 2  # header, three top-k, two W gradients per dead count, two aux decodes at 30


def test_screened_encode_parts_agree_at_a_tiny_size(tmp_path):
    """The script exits 1 unless session 13's and today's dot products, kept codes and rounding norms are equal."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "screened_encode_parts.py"), "--d-in", "16", "--d-sae", "256",
         "--tokens", "64", "--chunk", "32", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=BENCHMARKS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "screened_encode_parts.md").read_text()
    assert "dots True, keep True, norms True" in report
    assert len([line for line in report.splitlines() if line.startswith("| ")]) == 1 + 9


def test_scale_on_paper_turns_the_committed_rates_into_hours(tmp_path):
    out = tmp_path / "scale.md"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "scale_on_paper.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=BENCHMARKS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "paper's Pythia-70M run" in text and "full-depth Gemma 3 270M" in text
    # hours = tokens x CPU seconds per 1k tokens / 1000 / 3600: check one row against its source table
    paper = pd.read_csv(PEERS / "vs_paper_stack.csv")
    paper = paper[(paper["table"] == "speed") & paper.measurement.str.startswith("paper:")].iloc[0]
    hours = 20_000 * 128 * 3 * paper.cpu_s_per_1k_tokens / 1000 / 3600
    row = next(line for line in text.splitlines() if "paper's stack" in line)
    assert f"{hours:.3g}" in row or f"{hours:,.0f}" in row, (hours, row)
