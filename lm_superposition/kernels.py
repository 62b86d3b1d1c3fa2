"""float32 matmuls on the CPU through oneDNN instead of torch's default kernel, where oneDNN is faster.

torch sends a float32 CPU matmul to MKL, which reaches its full AVX-512 speed only on Intel's
CPUs. On the project's AMD EPYC, MKL ran at less than half of oneDNN's speed (oneDNN: torch's
other CPU kernel library, the one its bfloat16 matmuls already use) at every shape tried: 2.2x for
the forward's shapes, 1.8x for the SAE encode [1024, 512] x [512, 32768]
(results/benchmarks/peers/vs_paper_stack.md, roofline table). On an Intel Xeon with AMX it was
the other way round: MKL 1.1-1.5x faster than oneDNN for the encode and three of the forward's
four linear shapes, oneDNN faster only for the MLP's output (results/benchmarks/peers/xeon/), and
oneDNN's linear, which allocates its output, paid for fresh pages on every call. Hence
`float32_kernel`: oneDNN on AMD (and Hygon) x86 CPUs, torch's own matmul everywhere else, unless
told otherwise. torch reaches oneDNN's float32 linear only through a private op of its compiler
(`torch.ops.mkldnn._linear_pointwise`, which also fuses the bias and a ReLU), hence the checks in
`uses_onednn`; everywhere else `linear` is torch's own matmul. Under autograd its gradients are
oneDNN matmuls too (the SAE training step's).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import platform
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

FLOAT32_KERNELS = ("auto", "onednn", "torch")
KERNEL_VARIABLE = "LM_SUPERPOSITION_FLOAT32_KERNEL"
# the kernel of the innermost `float32_kernel(...)` block; per thread and per asyncio task
_chosen_kernel: contextvars.ContextVar[str | None] = contextvars.ContextVar("float32_kernel", default=None)


@contextlib.contextmanager
def float32_kernel(kernel: str):
    """Within the block, `linear` runs float32 CPU matmuls on `kernel`: "onednn", "torch" (torch's
    default, MKL on x86) or "auto" (`onednn_beats_mkl`). Outside any block the environment variable
    LM_SUPERPOSITION_FLOAT32_KERNEL decides, "auto" if unset. The kernels agree to float32
    rounding, not bit for bit."""
    if kernel not in FLOAT32_KERNELS:
        raise ValueError(f"float32 kernel must be one of {FLOAT32_KERNELS}, got {kernel!r}")
    token = _chosen_kernel.set(kernel)
    try:
        yield
    finally:
        _chosen_kernel.reset(token)


def chosen_float32_kernel() -> str:
    """The kernel `linear` picks for float32 now, "onednn" or "torch" (before `uses_onednn`'s checks)."""
    kernel = _chosen_kernel.get() or os.environ.get(KERNEL_VARIABLE, "auto")
    if kernel not in FLOAT32_KERNELS:
        raise ValueError(f"{KERNEL_VARIABLE} must be one of {FLOAT32_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "onednn" if onednn_beats_mkl() else "torch"
    return kernel


@functools.cache
def onednn_beats_mkl() -> bool:
    """True on x86 CPUs of AMD or Hygon, the CPUs on which MKL leaves its AVX-512 kernels unused
    (see the module's docstring for the speeds measured); False on Intel's and on any CPU whose
    maker cannot be read."""
    return cpu_vendor() in ("AuthenticAMD", "HygonGenuine")


def fast_bfloat16(device: torch.device | str) -> bool:
    """True where bfloat16 matmuls run several times faster than float32: CUDA GPUs with bfloat16
    support, and x86 CPUs with AMX or AVX512-BF16 (the project's Xeon: 3-8x, results/benchmarks/
    peers/xeon/vs_paper_stack.md, roofline table). Elsewhere a CPU emulates bfloat16 and runs it
    slower than float32, so the bfloat16 screens (codes.ScreenedSAE, codes.duplicate_groups) are
    not used there by default."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def cpu_vendor() -> str:
    """The x86 vendor string (GenuineIntel, AuthenticAMD, ...), or "" where it cannot be read."""
    if Path("/proc/cpuinfo").exists():
        return _cpuinfo_field("vendor_id") or ""
    text = platform.processor()  # e.g. Windows: "AMD64 Family 25 Model 1 Stepping 1, AuthenticAMD"
    return next((vendor for vendor in ("GenuineIntel", "AuthenticAMD", "HygonGenuine") if vendor in text), "")


def _cpuinfo_field(key: str) -> str | None:
    """The value of the first CPU's `key` line in /proc/cpuinfo, stripped; None where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def uses_onednn(weight: torch.Tensor) -> bool:
    """True where `linear` runs on oneDNN for this weight: float32 on a CPU, oneDNN the chosen
    kernel (`chosen_float32_kernel`), torch built with oneDNN and not told to leave it
    (`torch.backends.mkldnn.flags(enabled=False)`)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and chosen_float32_kernel() == "onednn"
    )


def compiles_per_shape(weight: torch.Tensor) -> bool:
    """True where a CPU matmul with this weight runs on oneDNN, which compiles a kernel for every
    new matmul shape: ~8 ms for a [254, n] @ [n, 640] bfloat16 matmul of a new n on the Intel Xeon
    of session 9, against 0.9 ms for a shape seen before. That is bfloat16 or float16 (the weight's
    dtype or a CPU autocast's) and `uses_onednn`; MKL's float32 kernels have no such cost."""
    if weight.device.type != "cpu":
        return False
    half = (torch.bfloat16, torch.float16)
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in half
    return autocast or weight.dtype in half or uses_onednn(weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """x @ weight + bias ([tokens, d_in] @ [d_in, d_out] + [d_out]), then a ReLU if asked.

    On oneDNN where `uses_onednn(weight)`, x is float32 too and autocast (which would run the
    matmul in half precision) is off; torch's matmul otherwise. Under autograd the gradients are
    oneDNN matmuls as well (`_OneDNNLinear`). The two kernels agree to float32 rounding, not bit
    for bit.
    """
    if not _onednn_applies(x, weight, bias):
        out = x @ weight
        if bias is not None:
            out = out + bias
        return out.relu_() if relu else out
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        out = _OneDNNLinear.apply(x, weight, bias)  # oneDNN's op has no backward of its own
        return out.relu() if relu else out
    return _onednn_linear(x, weight, bias, relu)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False):
    return torch.ops.mkldnn._linear_pointwise(x, weight.t(), bias, "relu" if relu else "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """x @ weight + bias with its three gradients, every matmul on oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = _onednn_linear(grad, weight.t(), None) if needs_x else None
        grad_weight = _onednn_linear(x.reshape(-1, x.shape[-1]).t(), grad_rows, None) if needs_weight else None
        grad_bias = grad_rows.sum(0) if needs_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


def model_linears_on_onednn() -> TorchFunctionMode:
    """A context in which every `torch.nn.functional.linear` (a model's nn.Linear layers) that
    `linear` would run on oneDNN runs there: the forward passes of TransformerLens models, whose
    float32 matmuls torch would send to MKL. On the 55-hook training benchmark it took ours from
    0.95x to 1.16x eai-sparsify's speed in float32, and the activations stayed within 2.6e-6
    relative of the Hugging Face model's (results/benchmarks/peers/gemma55_onednn/). Any other
    call passes through untouched. Where float32 does not run on oneDNN (`chosen_float32_kernel`
    at entry), a context that does nothing: a torch function mode sees every call in it."""
    return _ModelLinearsOnOneDNN() if chosen_float32_kernel() == "onednn" else contextlib.nullcontext()


class _ModelLinearsOnOneDNN(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            named = dict(zip(("input", "weight", "bias"), args)) | kwargs
            x, weight, bias = named.get("input"), named.get("weight"), named.get("bias")
            is_tensor = isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
            if is_tensor and _onednn_applies(x, weight.t(), bias):  # F.linear's weight is [out, in]
                return linear(x, weight.t(), bias)
        return func(*args, **kwargs)


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """`linear`'s test: float32 operands oneDNN can take, shapes that fit (else torch's matmul
    raises its own error, which names the shapes), and autocast off."""
    return (
        uses_onednn(weight)
        and x.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.shape[-1] == weight.shape[0]
        and not torch.is_autocast_enabled(x.device.type)
    )
