"""Where the layer-wise measurement spends its time: cProfile of LayerwiseAnalyzer.run_seed.

The same workload as layerwise_speed.py (Pythia-70M-shaped random model, one random
32,768-feature StandardSAE on each of the 19 paper hooks), one warm-up batch, then
--batches batches profiled. Prints the functions with the most time of their own.

    python -m experiments.benchmarks.profile_layerwise            # 2 batches of 1,016 tokens
    python -m experiments.benchmarks.profile_layerwise --encode-dtype bfloat16
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from experiments.benchmarks.layerwise_speed import MODEL_NAME, Setup, pythia_shaped_model, random_saes, random_windows
from lm_superposition.analyze import LayerwiseAnalyzer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=2, help="batches of 8 windows to profile after the warm-up")
    parser.add_argument("--d-sae", type=int, default=32_768)
    parser.add_argument("--top", type=int, default=15, help="how many functions to list")
    parser.add_argument("--encode-dtype", default=None, help="the analyzer's encode_dtype, e.g. bfloat16")
    args = parser.parse_args(argv)

    setup = Setup("cpu", "float32", args.d_sae, batch_size=8, context=128, threads=None)
    model = pythia_shaped_model(setup)
    analyzer = LayerwiseAnalyzer(
        model,
        random_saes(model, setup),
        model_name=MODEL_NAME,
        batch_size=setup.batch_size,
        encode_dtype=args.encode_dtype,
    )
    windows = random_windows((args.batches + 1) * setup.measured_per_batch, setup)
    analyzer.run_seed(windows[: setup.batch_size], progress=False)  # warm-up: buffers, MKL's packing

    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    state = analyzer.run_seed(windows[setup.batch_size :], progress=False)
    profile.disable()
    seconds = time.perf_counter() - started
    print(f"{state.tokens:,} tokens in {seconds:.1f} s = {state.tokens / seconds:.0f} tokens/s (under cProfile)")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
