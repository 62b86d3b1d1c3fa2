"""The layer-wise measurement against the paper's real stack: nnsight traces + dictionary_learning AutoEncoders.

Issue 16, item 1. In one run, on the same model, hooks, dictionaries and tokens:

  ours   `lm_superposition.measure_layers` (the whole public call, its table included; no
         CE-loss check, which the paper's loop does not do either), on the model loaded by
         `lm_superposition.load_model(folder)` and the dictionaries loaded from their ae.pt
         files by the project's dictionary_learning loader;
  paper  the loop of the paper's published script (leonardbereska/superposition-measurement,
         experiments/layerwise/pythia70m.py and pythia_fixed.py), run with the packages it
         imports: an nnsight `LanguageModel`, one `model.trace` per document saving the 19
         module outputs, one dictionary_learning `AutoEncoder.encode` per module, |z| summed
         into float32 per-feature totals, then F = exp(H) with the script's eps formula.

The model is a random-init `GPTNeoXForCausalLM` of Pythia-70M's real config (6 layers, d_model
512, 8 heads, d_mlp 2048, rotary_pct 0.25, vocab 50304, parallel residual), saved to a temporary
folder that both stacks load. The 19 dictionaries are dictionary_learning AutoEncoders of
32,768 latents, saved as ae.pt in the paper's folder layout; their encoders are set so their
codes are as sparse as trained dictionaries' (mean L0 ~200), since ours exploits sparsity.

A document is 128 random token ids with no BOS (pythia_fixed.py traces token ids; the paper
tokenised each text on its own, and Pythia's tokenizer adds no BOS). Ours gets the same
documents as windows without BOS (`TokenWindows(bos_token_id=None)`), so both measure the
same tokens with the same context.

Also measured, on the same documents: ours with the SAE encode in bfloat16 (`encode_dtype=
"bfloat16"`, the public call and run_seed alone), ours with float32's codes found by a bfloat16
screen (`encode_dtype="float32_screened"`, likewise; its F is checked against the paper's
totals like float32's), and the roofline: the bare matmuls of the
forward pass and of the 19 encodes (the actual shapes: 6 blocks of [1024, 512] x [512, 1536 /
512 / 2048] and [1024, 2048] x [2048, 512] plus attention's [128, 64] x [64, 128] per head, and
19 x [1024, 512] x [512, 32768] per batch of 8 documents), each timed in float32 and in bfloat16
in every round (median of 3 calls per shape, times how often a round needs it), with the faster of
torch.matmul and oneDNN's linear per shape (`Roofline`); the float32 roofline of torch.matmul
alone (MKL here), which earlier runs reported, is kept beside it.

Speed: the phases (ours's public call, ours's measurement alone, the paper's loop) take turns,
round after round (who goes first rotates), on fresh documents each round, after a warm-up round
that is not kept. Reported: wall tokens/s and CPU seconds (of the process, all threads) per 1k
tokens, totals over the rounds, their ratios to the paper's, and the median over rounds of the
paired per-round ratios. On the shared 2-core machine wall time swings with other jobs within a
round; CPU time and the paired medians move much less (compare the columns).
Correctness: in every round both measure the same documents; the report gives the largest
relative difference of F over the hooks and rounds, ours against F = exp(H) of the paper's
float32 totals (target <= 1e-6), and also against the F the paper's script prints (its
eps = 1e-12 inside the log shifts F by up to ~1e-6 relative by itself); and ours in bfloat16
against ours in float32 (the price of the reduced-precision encode; target <= 1e-3).

Needs the `bench` extra's peers: nnsight 0.8.1 and dictionary-learning 0.1.0 (installed with
--no-deps; see results/benchmarks/peers/README.md).

    python experiments/benchmarks/vs_paper_stack.py --smoke        # tiny model; exits 1 if F differs > 1e-6
                                                                   # (float32 or screened; bfloat16: > 1e-3)
    python experiments/benchmarks/vs_paper_stack.py --threads 1 --profile 25   # full size: 4 rounds x 32 x 128 tokens
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of the loaders and trainers (read when tqdm is imported)

import argparse
import cProfile
import io
import math
import pstats
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import torch

from lm_superposition import LayerwiseAnalyzer, effective_features, load_model, measure_layers, paper_hooks
from lm_superposition.data import TokenWindows
from lm_superposition.report import markdown_table as markdown  # also imported by the other benchmarks
from lm_superposition.saes import load_dictionary_learning_sae  # the project's ae.pt loader (not a top-level name)

# Run as a script (python experiments/benchmarks/vs_paper_stack.py) or as a module.
try:
    from matmul_kernels import matmul_kernels
except ImportError:
    from experiments.benchmarks.matmul_kernels import matmul_kernels

REPO_ROOT = Path(__file__).resolve().parents[2]

F_TOLERANCE = 1e-6
BF16_F_TOLERANCE = 1e-3  # the price for a reduced-precision encode
# --smoke: 128 tokens with ~2 codes on per token, where one near-threshold code switching on or off
# under bfloat16 rounding moves F by ~1%: the smoke checks that the option works, not its precision.
BF16_SMOKE_F_TOLERANCE = 0.05
TARGET_L0_FRACTION = 200 / 32_768  # codes on per token and latent, as in trained dictionaries
MODEL_NAME = "pythia-70m-deduped"

# Pythia-70M's Hugging Face config (EleutherAI/pythia-70m-deduped); random weights cost what trained ones do.
PYTHIA_70M_CONFIG = dict(
    vocab_size=50304,
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    intermediate_size=2048,
    rotary_pct=0.25,
    rotary_emb_base=10000,
    use_parallel_residual=True,
    hidden_act="gelu",
    max_position_embeddings=2048,
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=0,
    tie_word_embeddings=False,
)
# --smoke: the same architecture options, tiny.
SMOKE_CONFIG = PYTHIA_70M_CONFIG | dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    max_position_embeddings=256,
)


# ---- the shared setup: one model folder, one set of ae.pt files -------------------------------


def save_random_model(config: dict, folder: Path) -> None:
    """A random-init GPTNeoXForCausalLM and a word-level tokenizer over its vocabulary, as a HF folder.

    The tokenizer only has to exist (both stacks are given token ids): nnsight and
    lm_superposition.load_model read one from the folder."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(**config)).eval().save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t1")),
        bos_token="t0",
        eos_token="t0",
        pad_token="t0",
        unk_token="t1",
    )
    tokenizer.save_pretrained(folder)


def paper_layer_names(n_layers: int) -> list[str]:
    """The paper's layer_specs: embed, then attn_out, mlp_out and resid_out of every layer."""
    return ["embed"] + [
        f"{kind}_layer{layer}" for layer in range(n_layers) for kind in ("attn_out", "mlp_out", "resid_out")
    ]


def tl_hook_name(paper_name: str) -> str:
    """The TransformerLens hook holding the same activations as the paper's nnsight module output."""
    if paper_name == "embed":
        return "blocks.0.hook_resid_pre"  # Pythia: rotary, so the residual stream starts as the embedding
    kind, layer = paper_name.rsplit("_layer", 1)
    return (
        f"blocks.{layer}."
        + {"attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "resid_out": "hook_resid_post"}[kind]
    )


def ae_path(dictionaries: Path, paper_name: str, d_sae: int) -> Path:
    return dictionaries / paper_name / f"10_{d_sae}" / "ae.pt"  # the paper's layout


@torch.no_grad()
def save_random_dictionaries(folder: Path, dictionaries: Path, d_sae: int, documents: torch.Tensor) -> None:
    """One dictionary_learning AutoEncoder per paper module, saved as ae.pt.

    Set so its codes are as sparse as a trained dictionary's: `bias` (subtracted from the
    input) at the module's mean activation, encoder rows ~ N(0, 1/typical centred norm), and
    encoder.bias one threshold chosen on these calibration documents so that TARGET_L0_FRACTION
    of the codes are on (L0 ~200 of 32,768 latents on every hook). The decoder keeps
    dictionary_learning's init; F does not read it."""
    from dictionary_learning.dictionary import AutoEncoder
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(folder).eval()
    outputs = {}
    modules = {"embed": model.gpt_neox.embed_in}
    for layer, block in enumerate(model.gpt_neox.layers):
        modules |= {
            f"attn_out_layer{layer}": block.attention,
            f"mlp_out_layer{layer}": block.mlp,
            f"resid_out_layer{layer}": block,
        }
    handles = [
        module.register_forward_hook(
            lambda m, i, o, name=name: outputs.__setitem__(name, o[0] if isinstance(o, tuple) else o)
        )
        for name, module in modules.items()
    ]
    model(documents)
    for handle in handles:
        handle.remove()
    torch.manual_seed(0)
    for name in paper_layer_names(model.config.num_hidden_layers):
        acts = outputs[name].reshape(-1, model.config.hidden_size)
        ae = AutoEncoder(model.config.hidden_size, d_sae)
        ae.bias.copy_(acts.mean(0))
        centred = acts - ae.bias
        ae.encoder.weight.normal_(0, 1 / centred.norm(dim=-1).mean().item())
        pre_activations = (centred @ ae.encoder.weight.T).flatten()
        on = max(len(acts), round(TARGET_L0_FRACTION * pre_activations.numel()))  # at least L0 1 in the smoke size
        ae.encoder.bias.fill_(-pre_activations.kthvalue(pre_activations.numel() - on).values.item())
        path = ae_path(dictionaries, name, d_sae)
        path.parent.mkdir(parents=True)
        torch.save(ae.state_dict(), path)


def random_documents(n: int, context: int, vocab: int, seed: int) -> torch.Tensor:
    """[n, context] random token ids; id 0 (Pythia's <|endoftext|>) left out."""
    return torch.randint(1, vocab, (n, context), generator=torch.Generator().manual_seed(seed))


# ---- the paper's stack ----------------------------------------------------------------------


class PaperStack:
    """The paper's script, its loading and its per-document loop, against nnsight 0.8.1 and
    dictionary-learning 0.1.0 (the versions installable next to today's transformers)."""

    def __init__(self, folder: Path, dictionaries: Path, d_sae: int):
        from dictionary_learning.dictionary import AutoEncoder
        from nnsight import LanguageModel
        from transformers import AutoTokenizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nnsight 0.8 deprecates LanguageModel, the class the paper uses
            # nnsight 0.8.1 cannot find a local folder's tokenizer by itself: pass it in.
            self.model = LanguageModel(
                str(folder), tokenizer=AutoTokenizer.from_pretrained(folder), device_map="cpu", dispatch=True
            )
        self.device = torch.device("cpu")
        config = self.model.config
        self.layers = paper_layer_names(config.num_hidden_layers)
        self.d_sae = d_sae
        self.saes = {}
        for name in self.layers:
            sae = AutoEncoder(config.hidden_size, d_sae)
            sae.load_state_dict(
                torch.load(ae_path(dictionaries, name, d_sae), weights_only=True, map_location=self.device)
            )
            self.saes[name] = sae.to(self.device).eval()

    def _module_output(self, name: str):
        if name == "embed":
            return self.model.gpt_neox.embed_in.output.save()
        layer = int(name.split("layer")[1])
        if "mlp_out" in name:
            return self.model.gpt_neox.layers[layer].mlp.output.save()
        if "attn_out" in name:
            return self.model.gpt_neox.layers[layer].attention.output[0].save()
        # The paper saves `layers[i].output[0]`: in the transformers it was written for, a
        # decoder layer returned a tuple. transformers 5 returns the hidden states tensor, so
        # [0] would take the first (only) sequence, and the script's sum over dims (0, 1)
        # would add one scalar to every latent (F = d_sae). The tensor itself is the intent.
        return self.model.gpt_neox.layers[layer].output.save()

    def feature_sums(self, documents: torch.Tensor) -> dict[str, torch.Tensor]:
        """The paper's loop: one trace per document, one encode per module, float32 |z| totals."""
        sums = {name: torch.zeros(self.d_sae, dtype=torch.float32, device=self.device) for name in self.layers}
        for input_ids in documents:
            with torch.no_grad():
                activations = {}
                with self.model.trace(input_ids):
                    for name in self.layers:
                        activations[name] = self._module_output(name)
                for name in self.layers:
                    features = self.saes[name].encode(activations[name].to(self.device))
                    sums[name] += features.abs().sum(dim=(0, 1)).to(self.device)
                del activations, features
        return sums

    @staticmethod
    def feature_count(sums: torch.Tensor) -> float:
        """The script's calculate_functional_feature_count: exp(H) with eps = 1e-12 in the log."""
        p = sums / sums.sum()
        eps = 1e-12
        return (-torch.sum((p + eps) * torch.log(p + eps))).exp().item()

    def measure(self, documents: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        sums = self.feature_sums(documents)
        return sums, {name: self.feature_count(s) for name, s in sums.items()}


# ---- ours ------------------------------------------------------------------------------------------


class Ours:
    """The project's side. Same work as the paper's loop: no CE-loss check (ce_windows=0) and
    every latent its own feature (merge_duplicates=False: the paper does not look for duplicate
    latents; the dictionaries here have none, so F is the same either way, but searching for
    them is a per-call cost, reported apart: see `duplicate_search_seconds`)."""

    OPTIONS = dict(ce_windows=0, merge_duplicates=False)

    def __init__(
        self,
        folder: Path,
        dictionaries: Path,
        d_sae: int,
        batch_size: int,
        backend: str | None,
        encode_dtype: str = "float32",
        like: Ours | None = None,
    ):
        """like: another Ours whose model and SAEs to share (a second precision reads the same ones;
        19 SAEs of 32,768 latents are 2.4 GiB)."""
        self.encode_dtype = encode_dtype
        model = like.model if like else None
        self.model = model or load_model(str(folder), **({"backend": backend} if backend else {}))
        self.backend = type(self.model).__name__
        self.hooks = [hook.name for hook in paper_hooks(self.model)]
        by_hook = {tl_hook_name(name): name for name in paper_layer_names(self.model.cfg.n_layers)}
        assert set(by_hook) == set(self.hooks), (sorted(by_hook), self.hooks)
        self.saes = (
            like.saes
            if like
            else {
                hook: load_dictionary_learning_sae(
                    ae_path(dictionaries, by_hook[hook], d_sae), hook, model_name=MODEL_NAME
                )
                for hook in self.hooks
            }
        )
        self.batch_size = batch_size

    @staticmethod
    def windows(documents: torch.Tensor) -> TokenWindows:
        """The documents as windows without BOS, one document per window."""
        doc_ids = torch.arange(len(documents)).unsqueeze(1).expand_as(documents).contiguous()
        return TokenWindows(documents, doc_ids, bos_token_id=None, pad_token_id=None)

    def measure(self, documents: torch.Tensor) -> pd.DataFrame:
        """The public call: measure_layers, its table included."""
        return measure_layers(
            self.model,
            self.saes,
            self.windows(documents),
            batch_size=self.batch_size,
            progress=False,
            model_name=MODEL_NAME,
            encode_dtype=self.encode_dtype,
            **self.OPTIONS,
        )

    def run_seed(self, documents: torch.Tensor):
        """The measurement without the table (no bootstrap intervals): the per-token rate a
        long run (the paper's 20,000 documents) approaches, where the per-call table cost vanishes."""
        analyzer = LayerwiseAnalyzer(
            self.model,
            self.saes,
            batch_size=self.batch_size,
            model_name=MODEL_NAME,
            merge_duplicates=self.OPTIONS["merge_duplicates"],
            encode_dtype=self.encode_dtype,
        )
        return analyzer.run_seed(self.windows(documents), seed=0, progress=False)

    def duplicate_search_seconds(self) -> float:
        """What measure_layers' default merge_duplicates=True adds per call and SAE: the search for
        duplicate latents when the analyzer is built (timed on the first hook's SAE)."""
        hook = self.hooks[0]
        start = time.perf_counter()
        LayerwiseAnalyzer(self.model, {hook: self.saes[hook]}, model_name=MODEL_NAME, merge_duplicates=True)
        return time.perf_counter() - start


class Roofline:
    """The bare matmuls of one round of ours: the forward pass through every block (no
    unembedding: the deepest hook is the last block's output) and one SAE encode per hook, per
    batch of `batch_size` documents, in `dtype`. Each distinct shape is timed (median of 3 calls,
    after a warm-up call) and counted as often as a round needs it.

    kernels: "torch.matmul" times torch's default kernel (MKL for float32 on this CPU);
    "fastest" also times oneDNN's linear (`matmul_kernels`, what ours encodes float32 with) and
    keeps the faster per shape. On the project's AMD EPYC oneDNN ran float32 matmuls 1.8-2.2x faster
    than MKL, so a roofline of torch.matmul alone is no bound there: ours passes it. On an Intel
    Xeon MKL was the faster, for all shapes but one.
    """

    KERNELS = ("torch.matmul", "fastest")

    def __init__(
        self,
        config: dict,
        d_sae: int,
        n_hooks: int,
        batch_size: int,
        context: int,
        dtype: torch.dtype,
        kernels: str = "fastest",
    ):
        if kernels not in self.KERNELS:
            raise ValueError(f"kernels must be one of {self.KERNELS}, got {kernels!r}")
        d, mlp, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
        heads = batch_size * config["num_attention_heads"]
        d_head, rows = d // config["num_attention_heads"], batch_size * context
        self.batch_size, self.dtype, self.kernels = batch_size, dtype, kernels
        self.shapes = [  # (name, a, b, per batch)
            ("attention q, k, v", (rows, d), (d, 3 * d), layers),
            ("attention out", (rows, d), (d, d), layers),
            ("attention scores", (heads, context, d_head), (heads, d_head, context), layers),
            ("attention mix", (heads, context, context), (heads, context, d_head), layers),
            ("mlp in", (rows, d), (d, mlp), layers),
            ("mlp out", (rows, mlp), (mlp, d), layers),
            ("sae encode", (rows, d), (d, d_sae), n_hooks),
        ]
        self.last: list[dict] = []

    def seconds(self, documents: torch.Tensor) -> tuple[float, float]:
        """(wall, CPU) seconds the matmuls of ours on these documents take at this machine's matmul speed."""
        batches = -(-len(documents) // self.batch_size)
        self.last, wall, cpu = [], 0.0, 0.0
        for name, a_shape, b_shape, per_batch in self.shapes:
            a, b = torch.randn(a_shape, dtype=self.dtype), torch.randn(b_shape, dtype=self.dtype)
            flop = 2 * math.prod(a_shape) * b_shape[-1]
            timings = {}
            kernels = matmul_kernels(a, b)
            if self.kernels == "torch.matmul":
                kernels = {"torch.matmul": kernels["torch.matmul"]}
            for kernel, call in kernels.items():
                call()  # warm-up
                calls = [timed(call) for _ in range(3)]
                timings[kernel] = (sorted(c[1] for c in calls)[1], sorted(c[2] for c in calls)[1])
            kernel = min(timings, key=lambda k: timings[k][0])
            shape_wall, shape_cpu = timings[kernel]
            self.last.append(
                {
                    "matmul": name,
                    "a": a_shape,
                    "b": b_shape,
                    "per_batch": per_batch,
                    **{f"seconds_{k}": t[0] for k, t in timings.items()},
                    "kernel": kernel,
                    "seconds": shape_wall,
                    "gflop_per_s": flop / shape_wall / 1e9,
                }
            )
            wall += per_batch * batches * shape_wall
            cpu += per_batch * batches * shape_cpu
        return wall, cpu


def f_differences(table: pd.DataFrame, paper_sums: dict[str, torch.Tensor], paper_f: dict[str, float]) -> pd.DataFrame:
    """Per hook: ours's F against exp(H) of the paper's float32 totals, and against the paper's printed F."""
    ours = table.set_index("hook")
    rows = []
    for name, sums in paper_sums.items():
        hook = tl_hook_name(name)
        f_ours = float(ours.loc[hook, "F"])
        f_exact = effective_features(sums.double())
        rows.append(
            {
                "hook": hook,
                "paper_module": name,
                "tokens": int(ours.loc[hook, "tokens"]),
                "mean_l0": float(ours.loc[hook, "mean_l0"]),
                "F_ours": f_ours,
                "F_paper_totals": f_exact,
                "F_paper_printed": paper_f[name],
                "rel_diff": abs(f_ours / f_exact - 1),
                "rel_diff_printed": abs(f_ours / paper_f[name] - 1),
            }
        )
    return pd.DataFrame(rows)


# ---- the report ----------------------------------------------------------------------------------


def machine_line() -> str:
    cpus = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    return (
        f"{cpus[0] if cpus else 'unknown CPU'}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, float32 unless marked bfloat16, no GPU"
    )


def alternating_medians(calls: dict, repeats: int) -> dict[str, float]:
    """{name: median seconds of call()} over `repeats` rounds in which the calls take turns, after
    one warm-up call each (the other benchmarks' way to time contenders side by side)."""
    times = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def write_report(
    path: Path, title: str, script: str, argv, facts: list[str], table: pd.DataFrame, *more: str | pd.DataFrame
) -> None:
    """Print a benchmark's report and write it to `path`: the title, the command that reproduces it
    (`script` run with `argv`, None: this process's arguments), the machine, one line per fact,
    the table, then `more` (lines of text and further tables) in order."""
    arguments = sys.argv[1:] if argv is None else argv
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(script, REPO_ROOT), *arguments])
    header = "  \n".join([f"Command: `{command}`", f"Machine: {machine_line()}", *facts])
    sections = [markdown(part) if isinstance(part, pd.DataFrame) else part for part in (table, *more)]
    text = "\n\n".join([f"# {title}", header, *sections])
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def parse_micro_benchmark(parser: argparse.ArgumentParser, argv, repeats: int) -> tuple[argparse.Namespace, tuple]:
    """The micro-benchmarks' shared start: add --repeats (default `repeats`), --threads and --out to
    `parser`, parse `argv`, set torch's threads; returns the arguments and the load average before."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed calls of each, alternating (median kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, os.getloadavg()


def load_line(before, after) -> str:
    return "; ".join(
        f"{when} {', '.join(f'{x:.2f}' for x in values)}" for when, values in (("before", before), ("after", after))
    )


# ---- the run -----------------------------------------------------------------------------------------


def timed(function):
    """(result, wall seconds, CPU seconds of this process, all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def profile_top(function, n: int) -> str:
    """cProfile of one call: the `n` functions with the most time of their own."""
    profiler = cProfile.Profile()
    profiler.runcall(function)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(n)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    return "\n".join(line for line in lines[start:] if line.strip())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--documents",
        type=int,
        default=32,
        help="documents per round, measured by both, one public call each (default 32: 4,096 tokens)",
    )
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds after a warm-up round (default 4)")
    parser.add_argument("--context", type=int, default=128, help="tokens per document (default 128)")
    parser.add_argument("--d-sae", type=int, default=32_768, help="latents per dictionary (the paper's: 32,768)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="windows per forward pass for ours (measure_layers' default 8)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--backend", default=None, help="load_model's backend (default: the package's default)")
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=list(PHASES),
        default=list(PHASES),
        help="the contenders to run (default all; paper, roofline and ours or ours_bf16 are needed)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the rounds, cProfile one more round of each and print its N top functions",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model (d_model 64, 2 layers), 256-latent dictionaries, "
        "2 rounds of 4 documents of 32 tokens, 1 thread",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "results" / "benchmarks" / "peers",
        help="folder for vs_paper_stack{,_smoke}.{md,csv}",
    )
    args = parser.parse_args(argv)
    if not ({"paper", "roofline"} <= set(args.phases) and {"ours", "ours_bf16"} & set(args.phases)):
        parser.error("--phases needs paper, roofline, and ours or ours_bf16")
    if args.smoke:
        args.documents, args.rounds, args.context, args.d_sae, args.batch_size, args.threads = 4, 2, 32, 256, 2, 1
    for name in ("documents", "rounds", "context", "d_sae", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    return args


PHASES = {
    "ours": "ours: lm_superposition.measure_layers (the public call, table included)",
    "ours_run_seed": "ours, measurement only: LayerwiseAnalyzer.run_seed (no table)",
    "ours_bf16": "ours, bfloat16 encode: measure_layers(..., encode_dtype='bfloat16')",
    "ours_bf16_run_seed": "ours, bfloat16 encode, measurement only: run_seed",
    "ours_screened": "ours, float32 codes from a bfloat16 screen: measure_layers(..., encode_dtype='float32_screened')",
    "ours_screened_run_seed": "ours, float32 codes from a bfloat16 screen, measurement only: run_seed",
    "paper": "paper: nnsight trace + dictionary_learning AutoEncoder, one document at a time",
    "roofline": "roofline: float32 matmuls of forward + encode, the faster of torch.matmul and oneDNN per shape",
    "roofline_torch_matmul": "roofline of torch.matmul alone (MKL; the roofline of runs before oneDNN): float32",
    "roofline_bf16": "roofline: bfloat16 matmuls of forward + encode",
}
# phase: (dtype, kernels)
ROOFLINES = {
    "roofline": (torch.float32, "fastest"),
    "roofline_torch_matmul": (torch.float32, "torch.matmul"),
    "roofline_bf16": (torch.bfloat16, "fastest"),
}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SMOKE_CONFIG if args.smoke else PYTHIA_70M_CONFIG
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vs_paper_stack-") as tmp:
        folder, dictionaries = Path(tmp) / "model", Path(tmp) / "dictionaries"
        save_random_model(config, folder)
        save_random_dictionaries(
            folder, dictionaries, args.d_sae, random_documents(4, args.context, config["vocab_size"], seed=10_000)
        )
        paper = PaperStack(folder, dictionaries, args.d_sae)
        ours = Ours(folder, dictionaries, args.d_sae, args.batch_size, args.backend)
        ours_bf16 = Ours(folder, dictionaries, args.d_sae, args.batch_size, args.backend, "bfloat16", like=ours)
        ours_screened = Ours(
            folder, dictionaries, args.d_sae, args.batch_size, args.backend, "float32_screened", like=ours
        )
        rooflines = {
            name: Roofline(config, args.d_sae, len(ours.hooks), args.batch_size, args.context, dtype, kernels)
            for name, (dtype, kernels) in ROOFLINES.items()
        }
        calls = {
            "ours": ours.measure,
            "ours_run_seed": ours.run_seed,
            "ours_bf16": ours_bf16.measure,
            "ours_bf16_run_seed": ours_bf16.run_seed,
            "ours_screened": ours_screened.measure,
            "ours_screened_run_seed": ours_screened.run_seed,
            "paper": paper.measure,
            **{name: roofline.seconds for name, roofline in rooflines.items()},
        }
        calls = {name: call for name, call in calls.items() if name in args.phases}
        names = list(calls)

        rounds, differences = [], []
        for index in range(args.rounds + 1):  # round 0 warms everything up and is not kept
            documents = random_documents(args.documents, args.context, config["vocab_size"], seed=index)
            order = names[index % len(names) :] + names[: index % len(names)]  # who goes first rotates
            runs = {
                name: (None, *calls[name](documents)) if name in ROOFLINES else timed(partial(calls[name], documents))
                for name in order
            }
            if index == 0:
                continue
            tokens = documents.numel()
            (table, *_), ((paper_sums, paper_f), *_) = runs.get("ours", runs.get("ours_bf16")), runs["paper"]
            difference = f_differences(table, paper_sums, paper_f).assign(round=index)
            if "ours" not in runs:  # no float32 ours in this run (--phases): no float32 F check
                difference[["F_ours", "rel_diff", "rel_diff_printed"]] = math.nan
            if "ours_bf16" in runs:  # against float32 F: the paper's totals, equal to ours in float32 within 1e-8
                bf16 = runs["ours_bf16"][0].set_index("hook")
                difference["F_ours_bf16"] = difference.hook.map(bf16.F)
                difference["rel_diff_bf16"] = (difference.F_ours_bf16 / difference.F_paper_totals - 1).abs()
                if "ours" in runs:  # random dictionaries explain little: compare what they leave unexplained
                    unexplained = 1 - difference.hook.map(runs["ours"][0].set_index("hook").variance_explained)
                    unexplained_bf16 = 1 - difference.hook.map(bf16.variance_explained)
                    difference["rel_diff_unexplained_bf16"] = (unexplained_bf16 / unexplained - 1).abs()
            if "ours_screened" in runs:  # float32's codes: against the paper's totals, like float32
                screened = runs["ours_screened"][0].set_index("hook")
                difference["F_ours_screened"] = difference.hook.map(screened.F)
                difference["rel_diff_screened"] = (difference.F_ours_screened / difference.F_paper_totals - 1).abs()
            differences.append(difference)
            row = {"round": index, "order": " > ".join(order), "tokens": tokens}
            row |= {f"{name}_seconds": runs[name][1] for name in names}
            row |= {f"{name}_cpu_seconds": runs[name][2] for name in names}
            row |= {f"{name}_vs_paper": runs["paper"][1] / runs[name][1] for name in names if name != "paper"}
            row |= {f"{name}_vs_paper_cpu": runs["paper"][2] / runs[name][2] for name in names if name != "paper"}
            row |= {f"{name}_of_roofline": runs["roofline"][1] / runs[name][1] for name in names}
            rounds.append(
                row
                | {
                    "max_rel_diff_F": difference.rel_diff.max(),
                    "max_rel_diff_F_bf16": difference.get("rel_diff_bf16", pd.Series([math.nan])).max(),
                    "max_rel_diff_F_screened": difference.get("rel_diff_screened", pd.Series([math.nan])).max(),
                    "load_1min": os.getloadavg()[0],
                }
            )
        profiles, duplicate_seconds = {}, math.nan
        if args.profile:
            documents = random_documents(args.documents, args.context, config["vocab_size"], seed=args.rounds + 1)
            profiles = {
                name: profile_top(partial(calls[name], documents), args.profile)
                for name in ("ours_bf16", "ours_screened", "ours")
                if name in calls
            }
            duplicate_seconds = ours.duplicate_search_seconds()
        matmuls = pd.concat(
            [
                pd.DataFrame(roofline.last).assign(dtype=str(roofline.dtype), roofline=name)
                for name, roofline in rooflines.items()
                if roofline.last
            ]
        )
    load_after = os.getloadavg()

    rounds = pd.DataFrame(rounds)
    differences = pd.concat(differences, ignore_index=True)
    tokens = rounds.tokens.sum()
    speed = pd.DataFrame(
        [
            {
                "measurement": PHASES[name],
                "tokens": tokens,
                "seconds": rounds[f"{name}_seconds"].sum(),
                "cpu_s_per_1k_tokens": 1000 * rounds[f"{name}_cpu_seconds"].sum() / tokens,
            }
            for name in names
        ]
    )
    speed.insert(3, "tokens_per_s", speed.tokens / speed.seconds)
    speed["vs_paper"] = speed.tokens_per_s / speed.tokens_per_s[names.index("paper")]
    speed["vs_paper_cpu"] = speed.cpu_s_per_1k_tokens[names.index("paper")] / speed.cpu_s_per_1k_tokens
    # The paired ratios, round by round, are the least sensitive to the machine's load swinging between phases.
    speed["median_round_vs_paper"] = [rounds[f"{name}_vs_paper"].median() if name != "paper" else 1.0 for name in names]
    speed["median_round_vs_paper_cpu"] = [
        rounds[f"{name}_vs_paper_cpu"].median() if name != "paper" else 1.0 for name in names
    ]
    speed["of_fp32_roofline"] = speed.tokens_per_s / speed.tokens_per_s[names.index("roofline")]
    speed["median_round_of_fp32_roofline"] = [rounds[f"{name}_of_roofline"].median() for name in names]
    max_diff, max_diff_printed = differences.rel_diff.max(), differences.rel_diff_printed.max()
    max_diff_bf16 = differences.get("rel_diff_bf16", pd.Series([math.nan])).max()
    max_diff_unexplained_bf16 = differences.get("rel_diff_unexplained_bf16", pd.Series([math.nan])).max()
    max_diff_screened = differences.get("rel_diff_screened", pd.Series([math.nan])).max()
    bf16_tolerance = BF16_SMOKE_F_TOLERANCE if args.smoke else BF16_F_TOLERANCE
    per_hook = differences[differences["round"] == 1].drop(columns="round")
    table_seconds, table_seconds_bf16, table_seconds_screened = (
        (rounds[f"{call}_seconds"] - rounds[f"{call}_run_seed_seconds"]).median()
        if {call, f"{call}_run_seed"} <= set(names)
        else math.nan
        for call in ("ours", "ours_bf16", "ours_screened")
    )

    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, REPO_ROOT), *(sys.argv[1:] if argv is None else argv)]
    )
    n_layers = config["num_hidden_layers"]
    options = ", ".join(f"{key}={value}" for key, value in Ours.OPTIONS.items())
    packages = (
        "torch",
        "transformers",
        "nnsight",
        "dictionary-learning",
        "transformer-lens",
        "sae-lens",
        "lm-superposition",
    )
    versions = ", ".join(f"{p} {version(p)}" for p in packages)
    text = "\n\n".join(
        [
            "# Layer-wise measurement: ours vs the paper's stack (nnsight + dictionary_learning)",
            f"Command: `{command}`  \n"
            f"Machine: {machine_line()}  \n"
            f"Versions: {versions}  \n"
            f"Model: random-init GPTNeoXForCausalLM, {n_layers} layers, d_model {config['hidden_size']}, "
            f"{config['num_attention_heads']} heads, "
            f"d_mlp {config['intermediate_size']}, rotary_pct {config['rotary_pct']}, vocab {config['vocab_size']}, "
            f"parallel residual; "
            f"{len(per_hook)} hooks, dictionary_learning AutoEncoders of {args.d_sae} latents "
            f"(mean L0 {per_hook.mean_l0.mean():.0f}); "
            f"ours through `load_model(folder)` ({ours.backend}) and the project's ae.pt loader  \n"
            f"Tokens: {args.rounds} rounds x {args.documents} documents x {args.context} tokens "
            f"(random ids, no BOS), the same for all; "
            f"ours {args.batch_size} documents per forward pass, options {options} (the paper's loop does neither)  \n"
            f"F check: largest relative difference of F over hooks and rounds, "
            f"ours vs exp(H) of the paper's float32 totals "
            f"**{max_diff:.1e}** (target <= {F_TOLERANCE:g}); "
            f"vs the F the paper's script prints (eps 1e-12 in its log) {max_diff_printed:.1e}  \n"
            f"bfloat16 encode: largest relative difference of F over hooks and rounds, ours in bfloat16 vs float32 "
            f"(exp(H) of the paper's float32 totals, ours's float32 F within 1e-8) "
            f"**{max_diff_bf16:.1e}** (target <= {bf16_tolerance:g}); "
            f"variance explained, decoded from the bfloat16 codes and decoder rows: largest relative difference "
            f"of the unexplained variance (1 - VE) from float32's {max_diff_unexplained_bf16:.1e}  \n"
            f"float32 codes from a bfloat16 screen: largest relative difference of F over hooks and rounds vs "
            f"exp(H) of the paper's float32 totals **{max_diff_screened:.1e}** (target <= {F_TOLERANCE:g})  \n"
            f"Phases run: {', '.join(names)}  \n"
            f"Table (bootstrap intervals) per call: {table_seconds:.1f} s float32, "
            f"{table_seconds_bf16:.1f} s bfloat16, {table_seconds_screened:.1f} s screened "
            f"(median over rounds of measure_layers minus run_seed)"
            + (
                f"; measure_layers' default merge_duplicates=True would add {duplicate_seconds:.1f} s per SAE per call "
                f"(duplicate-latent search, timed once on one {args.d_sae}-latent SAE)"
                if not math.isnan(duplicate_seconds)
                else ""
            )
            + "  \n"
            f"Load average (1, 5, 15 min): {load_line(load_before, load_after)}",
            markdown(speed),
            "Per round (the order rotates; round 0 was a warm-up):",
            markdown(rounds),
            "F per hook, round 1:",
            markdown(per_hook),
            "Roofline matmuls, last round (seconds: median of 3 calls; per_batch: calls per batch of "
            f"{args.batch_size} documents):",
            markdown(matmuls.astype({"a": str, "b": str})),
            *(
                [
                    f"cProfile of one more round, {name} (top functions by own time):\n\n```\n{profile}\n```"
                    for name, profile in profiles.items()
                ]
            ),
        ]
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("vs_paper_stack_smoke" if args.smoke else "vs_paper_stack")
    stem.with_suffix(".md").write_text(text + "\n")
    pd.concat(
        [speed.assign(table="speed"), rounds.assign(table="rounds"), differences.assign(table="f_per_hook")]
    ).to_csv(stem.with_suffix(".csv"), index=False)
    print(f"\nwrote {stem}.md and {stem}.csv")
    if "ours" in names and not max_diff <= F_TOLERANCE:
        print(
            f"FAIL: F differs by {max_diff:.2e} > {F_TOLERANCE:g} between ours and the paper's stack", file=sys.stderr
        )
        return 1
    if "ours_bf16" in names and not max_diff_bf16 <= bf16_tolerance:
        print(f"FAIL: the bfloat16 encode moves F by {max_diff_bf16:.2e} > {bf16_tolerance:g}", file=sys.stderr)
        return 1
    if "ours_screened" in names and not max_diff_screened <= F_TOLERANCE:
        print(f"FAIL: the screened encode moves F by {max_diff_screened:.2e} > {F_TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
