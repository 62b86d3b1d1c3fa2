"""`lm-superposition`: a thin shell over the Python API.

Its options are generated from the config dataclasses (config.py): each option's flag, type,
help and default come from one field, so the CLI cannot drift from the API or the TOML files.
An option left out is not passed on, and the dataclass's default applies.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
import types
import typing
from pathlib import Path

from . import config as cfg

EXAMPLES = {
    "demo": (
        "example:\n"
        "  lm-superposition demo                       # Gemma 3 270M, offline corpus, SAEs trained on the spot\n"
        "  lm-superposition demo --token-budget 2000 --output runs/tiny --overwrite"
    ),
    "run": (
        "example:\n  lm-superposition run lm_superposition/configs/demo.toml\n"
        "  lm-superposition run experiments/pythia70m_layerwise.toml --resume\n"
        "  torchrun --nproc_per_node=4 -m lm_superposition run experiments/pythia70m_layerwise.toml"
        "   # windows shared out"
    ),
    "layerwise": (
        "example (the paper's run; needs the model hub):\n"
        "  lm-superposition layerwise --model pythia-70m-deduped \\\n"
        "      --release pythia-70m-deduped-res-sm pythia-70m-deduped-mlp-sm pythia-70m-deduped-att-sm \\\n"
        "      --dataset monology/pile-uncopyrighted --token-budget 1000000 --seeds 0 1 2 --output runs/pythia70m"
    ),
    "hooks": (
        "example:\n  lm-superposition hooks --model pythia-70m-deduped\n"
        "  lm-superposition hooks            # the offline default, Gemma 3 270M"
    ),
    "train-sae": (
        "example:\n  lm-superposition train-sae --hooks blocks.3.hook_resid_post blocks.6.hook_resid_post "
        "--training-tokens 50000 --out saes/gemma"
    ),
}

# The config fields each command offers, by table ("saes.train" is [saes.train]).
LAYERWISE_OPTIONS = {
    "run": [
        "output",
        "encode_dtype",
        "seeds",
        "token_budget",
        "batch_size",
        "context_size",
        "device",
        "checkpoint_every",
        "ce_windows",
        "additivity_pairs",
        "n_blocks",
        "target_relative_interval",
    ],
    "model": ["names", "checkpoints", "dtype", "backend"],
    "saes": ["releases", "folders", "allow_hook_mismatch"],
    "corpus": ["sources", "config", "split", "text_column"],
}
TRAIN_SAE_OPTIONS = {
    "saes.train": [f.name for f in dataclasses.fields(cfg.SAETrainSettings) if f.name != "model_name"],
    "model": ["names", "dtype", "backend"],
    "corpus": ["sources", "config", "split", "text_column"],
    "run": ["context_size", "batch_size", "ce_windows"],
}
DEMO_OPTIONS = {"run": ["output", "token_budget"], "saes.train": ["training_tokens"]}
TABLES = {
    "run": cfg.RunSettings,
    "model": cfg.ModelSettings,
    "saes": cfg.SAESettings,
    "corpus": cfg.CorpusSettings,
    "saes.train": cfg.SAETrainSettings,
}


def add_config_options(
    parser: argparse.ArgumentParser, options: dict[str, list[str]], defaults: cfg.RunConfig | None = None
) -> None:
    """One option per config field named in `options` ({table: [field, ...]}); `defaults`
    (a RunConfig) gives the defaults shown in the help, else each field's own default."""
    for table, names in options.items():
        kind = TABLES[table]
        hints = typing.get_type_hints(kind)
        fields = {f.name: f for f in dataclasses.fields(kind)}
        group = parser.add_argument_group(f"[{table}]")
        for name in names:
            field = fields[name]
            hint = _without_none(hints[name])
            kwargs = {"dest": f"{table}:{name}", "default": None, "help": field.metadata.get("help", "")}
            default = _lookup(defaults, table, name) if defaults is not None else _field_default(field)
            kwargs["help"] += f" (default: {default})" if default not in (None, []) else ""
            if hint is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(hint) is list:
                kwargs.update(nargs="+", action="extend", type=typing.get_args(hint)[0])
            else:
                kwargs["type"] = hint
            if name == "architecture":
                kwargs["choices"] = cfg.ARCHITECTURES
            if name == "dtype":
                kwargs["choices"] = cfg.DTYPES
            if name == "backend":
                kwargs["choices"] = cfg.BACKENDS
            if name == "encode_dtype":
                kwargs["choices"] = cfg.ENCODE_DTYPES
            group.add_argument(field.metadata.get("flag") or "--" + name.replace("_", "-"), **kwargs)


def given_config(args: argparse.Namespace) -> dict:
    """The config options given on the command line, as nested TOML-like tables."""
    tables: dict = {}
    for dest, value in vars(args).items():
        if ":" in dest and value is not None:
            table, name = dest.split(":")
            target = tables
            for part in table.split("."):
                target = target.setdefault(part, {})
            target[name] = value
    return tables


def _without_none(hint):
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint


def _field_default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else None


def _lookup(config: cfg.RunConfig, table: str, name: str):
    target = config
    for part in table.split("."):
        target = getattr(target, part)
    return getattr(target, name)


def _command(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name, help=help, description=help, epilog=EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", action="store_true", help="continue the run in the output folder (refused if its config differs)"
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output folder (only a run folder this tool made, holding nothing else)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm-superposition",
        description="Measure superposition as lossy compression: F = exp(H) and psi = F/N per layer.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = _command(
        commands, "demo", "The main job offline: Gemma 3 270M, SAEs trained on the spot, the compression curve."
    )
    add_config_options(demo, DEMO_OPTIONS, defaults=cfg.demo_config())
    _add_output_flags(demo)

    run = _command(commands, "run", "A scripted probing run: a TOML config in, a run folder out.")
    run.add_argument("config", type=Path, help="TOML config (see experiments/*.toml, lm_superposition/configs/)")
    add_config_options(run, {"run": ["output"]})
    _add_output_flags(run)

    layerwise = _command(
        commands, "layerwise", "Per-layer psi of a model through pretrained SAEs (SAE-Lens registry or folders)."
    )
    add_config_options(layerwise, LAYERWISE_OPTIONS)
    _add_output_flags(layerwise)

    hooks = _command(commands, "hooks", "List a model's measurable hook points with their kind, layer and width N.")
    add_config_options(hooks, {"model": ["names", "backend"]})

    train = _command(
        commands, "train-sae", "Train SAEs for several hooks from one pass over the data, saved in SAE-Lens format."
    )
    train.add_argument("--out", type=Path, required=True, help="folder; each SAE goes to OUT/<hook name>/")
    add_config_options(train, TRAIN_SAE_OPTIONS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except KeyboardInterrupt as stopped:  # runs.RunInterrupted, or Ctrl-C outside a run
        resumable = getattr(stopped, "resumable", None)
        if resumable:
            again = [arg for arg in argv if arg != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
            print(
                f"lm-superposition {args.command}: {stopped}. "
                f"Continue with: {shlex.join(['lm-superposition', *again])}",
                file=sys.stderr,
            )
        elif resumable is False:
            print(
                f"lm-superposition {args.command}: {stopped} before writing anything; nothing on disk changed. "
                f"Start again with: {shlex.join(['lm-superposition', *argv])}",
                file=sys.stderr,
            )
        else:
            print(f"lm-superposition {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        print(f"lm-superposition {args.command}: error: {error}", file=sys.stderr)
        return 2


def _demo(args) -> int:
    overrides = given_config(args)
    config = cfg.demo_config(
        output=overrides.get("run", {}).get("output"),
        token_budget=overrides.get("run", {}).get("token_budget"),
        training_tokens=overrides.get("saes", {}).get("train", {}).get("training_tokens"),
    )
    return _run_and_show(config, args)


def _run(args) -> int:
    config = cfg.RunConfig.from_toml(args.config)
    output = given_config(args).get("run", {}).get("output")
    if output:
        config.run.output = output
    return _run_and_show(config, args)


def _layerwise(args) -> int:
    return _run_and_show(cfg.RunConfig.from_dict(given_config(args)), args)


def _run_and_show(config: cfg.RunConfig, args) -> int:
    from . import report, runs

    rank = _join_torchrun(config)
    started = time.time()
    table = runs.run(config, resume=args.resume, overwrite=args.overwrite)
    if rank != 0:
        return 0
    print(report.format_table(table))
    print(f"\nwrote {config.run.output}/ (layerwise.csv, compression_curve.png, ...) in {time.time() - started:.0f} s")
    return 0


def _join_torchrun(config: cfg.RunConfig) -> int:
    """Under `torchrun --nproc_per_node=K lm-superposition run ...`, join the process group
    (NCCL on GPUs, one per process; gloo on CPU) and return this process's rank."""
    import os

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

    given = given_config(args).get("model", {})
    for name in given.get("names") or cfg.ModelSettings().names:
        print(
            hook_table(load_model(name, backend=given.get("backend", cfg.ModelSettings().backend))).to_string(
                index=False
            )
        )
    return 0


def _train_sae(args) -> int:
    from . import runs

    given = given_config(args)
    config = cfg.RunConfig.from_dict(given | {"saes": {"train": given.get("saes", {}).get("train", {})}})
    for hook, folder in runs.train_only(config, args.out).items():
        print(f"{hook}: {folder}")
    return 0


COMMANDS = {"demo": _demo, "run": _run, "layerwise": _layerwise, "hooks": _hooks, "train-sae": _train_sae}

if __name__ == "__main__":
    sys.exit(main())
