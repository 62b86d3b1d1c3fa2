"""float32 matmuls on the CPU through oneDNN instead of torch's default kernel.

torch sends a float32 CPU matmul to MKL. On this project's AMD EPYC (AVX-512), MKL ran at less
than half of oneDNN's speed (oneDNN: torch's other CPU kernel library, the one its bfloat16
matmuls already use) at every shape tried: 2.2x for the forward's shapes, 1.8x for the SAE encode
[1024, 512] x [512, 32768] (results/benchmarks/peers/vs_paper_stack.md, roofline table). torch
reaches oneDNN's float32 linear only through a private op of its compiler
(`torch.ops.mkldnn._linear_pointwise`, which also fuses the bias and a ReLU), hence the checks in
`uses_onednn`; everywhere else `linear` is torch's own matmul. Under autograd its gradients are
oneDNN matmuls too (the SAE training step's).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def uses_onednn(weight: torch.Tensor) -> bool:
    """True where `linear` runs on oneDNN for this weight: float32 on a CPU, torch built with oneDNN
    and not told to leave it (`torch.backends.mkldnn.flags(enabled=False)`)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


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
    call passes through untouched."""
    return _ModelLinearsOnOneDNN()


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
