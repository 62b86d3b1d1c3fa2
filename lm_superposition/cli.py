"""`lm-superposition`: a thin shell over the Python API (runs, models, dictionaries)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .models import OFFLINE_DEFAULT_MODEL

EXAMPLES = {
    "demo": "example:\n  lm-superposition demo                       # Gemma 3 270M, offline corpus, SAEs trained on the spot\n  lm-superposition demo --token-budget 2000 --output runs/tiny --overwrite",
    "run": (
        "example:\n  lm-superposition run experiments/gemma3_270m_offline.toml\n"
        "  lm-superposition run experiments/pythia70m_layerwise.toml --resume\n"
        "  torchrun --nproc_per_node=4 -m lm_superposition run experiments/pythia70m_layerwise.toml   # windows shared out"
    ),
    "layerwise": (
        "example (the paper's run; needs the model hub):\n"
        "  lm-superposition layerwise --model pythia-70m-deduped \\\n"
        "      --release pythia-70m-deduped-res-sm --release pythia-70m-deduped-mlp-sm --release pythia-70m-deduped-att-sm \\\n"
        "      --dataset monology/pile-uncopyrighted --token-budget 1000000 --seeds 0 1 2 --output runs/pythia70m"
    ),
    "hooks": "example:\n  lm-superposition hooks --model pythia-70m-deduped\n  lm-superposition hooks            # the offline default, Gemma 3 270M",
    "train-sae": (
        "example:\n  lm-superposition train-sae --hooks blocks.3.hook_resid_post blocks.6.hook_resid_post "
        "--training-tokens 50000 --out saes/gemma"
    ),
}


def _command(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name, help=help, description=help, epilog=EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run already in the output folder")
    group.add_argument("--overwrite", action="store_true", help="delete the output folder first")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm-superposition",
        description="Measure superposition as lossy compression: F = exp(H) and psi = F/N per layer.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = _command(commands, "demo", "The main job offline: Gemma 3 270M, SAEs trained on the spot, the compression curve.")
    demo.add_argument("--output", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--token-budget", type=int, default=None, help="tokens measured per seed (default: the demo's)")
    demo.add_argument("--training-tokens", type=int, default=None, help="tokens to train each SAE on (default: the demo's)")
    _add_output_flags(demo)

    run = _command(commands, "run", "A scripted probing run: a TOML config in, a run folder out.")
    run.add_argument("config", type=Path, help="TOML config (see experiments/*.toml)")
    run.add_argument("--output", default=None, help="override [run] output")
    _add_output_flags(run)

    layerwise = _command(commands, "layerwise", "Per-layer psi of a model through pretrained SAEs from the SAE-Lens registry.")
    layerwise.add_argument("--model", default=OFFLINE_DEFAULT_MODEL, help="TransformerLens name or local folder")
    layerwise.add_argument("--checkpoint", type=int, action="append", default=[], help="Pythia training step (repeatable)")
    layerwise.add_argument("--release", action="append", default=[], help="SAE-Lens release, all of its SAEs (repeatable)")
    layerwise.add_argument("--sae-folder", action="append", default=[], help="SAE-Lens folder on disk (repeatable)")
    layerwise.add_argument("--dataset", default="offline", help="HF dataset name, local path, or 'offline'")
    layerwise.add_argument("--dataset-config", default=None)
    layerwise.add_argument("--split", default="train")
    layerwise.add_argument("--text-column", default="text")
    layerwise.add_argument("--token-budget", type=int, default=100_000, help="tokens measured per seed")
    layerwise.add_argument("--seeds", type=int, nargs="+", default=[0])
    layerwise.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    layerwise.add_argument("--context-size", type=int, default=128)
    layerwise.add_argument("--device", default="cpu")
    layerwise.add_argument("--additivity-pairs", type=int, default=0,
                           help="text-segment pairs for the linear-additivity column (default 0: skipped)")
    layerwise.add_argument("--output", default="runs/layerwise")
    _add_output_flags(layerwise)

    hooks = _command(commands, "hooks", "List a model's measurable hook points with their kind, layer and width N.")
    hooks.add_argument("--model", default=OFFLINE_DEFAULT_MODEL)

    train = _command(commands, "train-sae", "Train SAEs for several hooks from one pass over the data, saved in SAE-Lens format.")
    train.add_argument("--model", default=OFFLINE_DEFAULT_MODEL)
    train.add_argument("--hooks", nargs="+", required=True, help="hook names (see `lm-superposition hooks`)")
    train.add_argument("--out", type=Path, required=True, help="folder; each SAE goes to OUT/<hook name>/")
    train.add_argument("--dataset", default="offline")
    train.add_argument("--architecture", choices=["standard", "topk"], default="standard")
    train.add_argument("--expansion-factor", type=int, default=8)
    train.add_argument("--l1-coefficient", type=float, default=5.0)
    train.add_argument("--k", type=int, default=32)
    train.add_argument("--lr", type=float, default=4e-4)
    train.add_argument("--training-tokens", type=int, default=200_000, help="tokens of SAE training (repeats included)")
    train.add_argument("--epochs", type=int, default=1, help="passes over the model's activations (>1 keeps them in memory)")
    train.add_argument("--batch-size-tokens", type=int, default=4096)
    train.add_argument("--eval-windows", type=int, default=8, help="held-out windows each SAE is judged on (quality.json)")
    train.add_argument("--context-size", type=int, default=128)
    train.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    train.add_argument("--device", default="cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        print(f"lm-superposition {args.command}: error: {error}", file=sys.stderr)
        return 2


def _demo(args) -> int:
    from . import runs

    config = runs.demo_config(args.output, token_budget=args.token_budget, training_tokens=args.training_tokens)
    return _run_and_show(config, args)


def _run(args) -> int:
    from . import runs

    config = runs.RunConfig.from_toml(args.config)
    if args.output:
        config.run.output = args.output
    return _run_and_show(config, args)


def _layerwise(args) -> int:
    from . import runs

    config = runs.RunConfig.from_dict(
        {
            "run": {
                "output": args.output, "seeds": args.seeds, "token_budget": args.token_budget, "batch_size": args.batch_size,
                "context_size": args.context_size, "device": args.device, "additivity_pairs": args.additivity_pairs,
            },
            "model": {"names": [args.model], "checkpoints": args.checkpoint},
            "saes": {"releases": args.release, "folders": args.sae_folder},
            "corpus": {"sources": [args.dataset], "config": args.dataset_config, "split": args.split, "text_column": args.text_column},
        }
    )
    return _run_and_show(config, args)


def _run_and_show(config, args) -> int:
    from . import report, runs

    rank = _join_torchrun(config)
    started = time.time()
    table = runs.run(config, resume=args.resume, overwrite=args.overwrite)
    if rank != 0:
        return 0
    print(report.format_table(table))
    print(f"\nwrote {config.run.output}/ (layerwise.csv, compression_curve.png, ...) in {time.time() - started:.0f} s")
    return 0


def _join_torchrun(config) -> int:
    """Under `torchrun --nproc_per_node=K lm-superposition run ...`, join the process group
    (NCCL on GPUs, one per process; gloo on CPU) and return this process's rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0
    import torch
    import torch.distributed as dist

    if config.run.device.startswith("cuda"):
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        config.run.device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if config.run.device.startswith("cuda") else "gloo")
    return dist.get_rank()


def _hooks(args) -> int:
    from .models import hook_table, load_model

    print(hook_table(load_model(args.model)).to_string(index=False))
    return 0


def _train_sae(args) -> int:
    from .data import load_texts, token_windows
    from .dictionaries import SAETrainingConfig, text_tokens_for_training, train_saes_for_model
    from .models import load_model

    model = load_model(args.model, device=args.device)
    config = SAETrainingConfig(
        architecture=args.architecture, expansion_factor=args.expansion_factor, l1_coefficient=args.l1_coefficient,
        k=args.k, lr=args.lr, training_tokens=args.training_tokens, batch_size_tokens=args.batch_size_tokens, epochs=args.epochs,
        device=args.device, model_name=args.model,
    )
    budget = text_tokens_for_training(config, args.eval_windows, args.context_size)
    windows = token_windows(load_texts(args.dataset), model.tokenizer, context_size=args.context_size, token_budget=budget)
    folders = train_saes_for_model(model, args.hooks, windows, config, args.out, batch_size=args.batch_size, n_eval_windows=args.eval_windows)
    for hook, folder in folders.items():
        print(f"{hook}: {folder}")
    return 0


COMMANDS = {"demo": _demo, "run": _run, "layerwise": _layerwise, "hooks": _hooks, "train-sae": _train_sae}

if __name__ == "__main__":
    sys.exit(main())
