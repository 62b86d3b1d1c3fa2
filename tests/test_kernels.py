"""kernels.linear: oneDNN's float32 linear where it may run, torch's matmul elsewhere, the same numbers."""

from pathlib import Path

import pytest
import torch

from lm_superposition import kernels
from lm_superposition.kernels import compiles_per_shape, float32_kernel, linear, model_linears_on_onednn, uses_onednn


def _inputs():
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((33, 24), (24, 40), (40,)))
    return x, weight, bias


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("onednn", [True, False])
def test_linear_equals_the_matmul(relu, onednn):
    x, weight, bias = _inputs()
    expected = x.double() @ weight.double() + bias.double()
    if relu:
        expected = expected.relu()
    with torch.no_grad(), float32_kernel("onednn" if onednn else "torch"):
        assert uses_onednn(weight) == onednn
        out = linear(x, weight, bias, relu=relu)
        assert torch.allclose(out.double(), expected, atol=1e-5)
        assert torch.allclose(linear(x, weight).double(), x.double() @ weight.double(), atol=1e-5)
    assert out.dtype == torch.float32 and out.shape == (33, 40)
    assert not relu or (out >= 0).all()


def test_linear_under_autograd_runs_its_gradients_on_onednn():
    """With autograd on, the product and both gradients are oneDNN matmuls (three calls), with
    the gradients of torch's matmul; under autocast torch's matmul runs, in bfloat16."""
    x, weight, bias = _inputs()
    params = (x.requires_grad_(True), weight.requires_grad_(True), bias.requires_grad_(True))
    grad = torch.randn(33, 40)
    expected = torch.autograd.grad(x.double() @ weight.double() + bias.double(), params, grad.double())
    calls = []
    original = torch.ops.mkldnn._linear_pointwise
    with pytest.MonkeyPatch.context() as patch, float32_kernel("onednn"):
        patch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: calls.append(args) or original(*args))
        got = torch.autograd.grad(linear(x, weight, bias), params, grad)
        relu_grad = torch.autograd.grad(linear(x, weight, bias, relu=True), weight, grad)[0]
    assert len(calls) == 6
    for name, want, have in zip(("x", "weight", "bias"), expected, got, strict=True):
        assert have.dtype == torch.float32 and torch.allclose(want.float(), have, atol=1e-4), name
    active = (x.detach().double() @ weight.detach().double() + bias.detach().double()) > 0
    want_relu = x.detach().double().T @ (grad.double() * active)
    assert torch.allclose(relu_grad.double(), want_relu, atol=1e-4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        product = linear(x, weight)
    assert product.dtype == torch.bfloat16  # the matmul ran in bfloat16, as autocast asks
    assert not uses_onednn(weight.detach().double())


def test_model_linears_on_onednn_give_the_layers_outputs():
    """Inside the mode a module's float32 nn.Linear runs on oneDNN (any leading dims, with and
    without bias); outside it, and for float64, torch's own kernel: the same outputs."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 8, bias=False))
    x = torch.randn(3, 5, 24)
    calls = []
    with torch.inference_mode():
        expected = layers(x)
        original = torch.ops.mkldnn._linear_pointwise
        with pytest.MonkeyPatch.context() as patch:
            counting = lambda *args: calls.append(args[3]) or original(*args)  # noqa: E731
            patch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
            with float32_kernel("onednn"), model_linears_on_onednn():
                out = layers(x)
                by_keyword = torch.nn.functional.linear(input=x, weight=layers[0].weight, bias=None)
                with pytest.raises(RuntimeError, match="cannot be multiplied"):  # torch's message, not oneDNN's
                    layers[2](x)
                float64 = layers.double()(x.double())
    assert len(calls) == 3  # both float32 layers and the call by keywords went to oneDNN, float64 did not
    assert by_keyword.shape == (3, 5, 40)
    assert out.shape == (3, 5, 8) and torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(float64.float(), expected, atol=1e-5)


def test_the_float32_kernel_is_onednn_on_amd_and_torchs_on_intel(monkeypatch):
    """auto: oneDNN on AMD and Hygon (MKL's slow CPUs here), torch's matmul on Intel and unknown
    CPUs; the environment variable and a float32_kernel block override it, the block winning."""
    weight = torch.randn(4, 3)
    monkeypatch.delenv(kernels.KERNEL_VARIABLE, raising=False)
    for vendor, expected in (("AuthenticAMD", True), ("HygonGenuine", True), ("GenuineIntel", False), ("", False)):
        monkeypatch.setattr(kernels, "cpu_vendor", lambda vendor=vendor: vendor)
        kernels.onednn_beats_mkl.cache_clear()
        assert uses_onednn(weight) == expected, vendor
        assert isinstance(model_linears_on_onednn(), kernels._ModelLinearsOnOneDNN) == expected, vendor
    kernels.onednn_beats_mkl.cache_clear()
    monkeypatch.setenv(kernels.KERNEL_VARIABLE, "onednn")
    assert uses_onednn(weight)
    with float32_kernel("torch"):
        assert not uses_onednn(weight)
        with float32_kernel("onednn"), torch.backends.mkldnn.flags(enabled=False):
            assert not uses_onednn(weight)  # torch told to leave oneDNN: it does
    monkeypatch.setenv(kernels.KERNEL_VARIABLE, "mkl")
    valid = r"\('auto', 'onednn', 'torch'\)"
    with pytest.raises(ValueError, match=rf"LM_SUPERPOSITION_FLOAT32_KERNEL must be one of {valid}, got 'mkl'"):
        uses_onednn(weight)
    with pytest.raises(ValueError, match="float32 kernel must be one of"), float32_kernel("fast"):
        pass


def test_cpu_vendor_reads_this_machine():
    """On Linux x86 the vendor comes from /proc/cpuinfo; elsewhere it may be empty, never an error."""
    vendor = kernels.cpu_vendor()
    assert isinstance(vendor, str)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "vendor_id" in cpuinfo.read_text():
        assert vendor and vendor in cpuinfo.read_text()


def test_fast_bfloat16_needs_amx_or_avx512_bf16_on_a_cpu(monkeypatch):
    """The bfloat16 screens run by default only where a CPU has bfloat16 matmul units."""
    real = kernels._cpu_flags.__wrapped__()  # this machine's, read afresh
    for flags, expected in (({"amx_bf16", "avx512f"}, True), ({"avx512_bf16"}, True), ({"avx512f", "avx2"}, False)):
        monkeypatch.setattr(kernels, "_cpu_flags", lambda flags=flags: frozenset(flags))
        assert kernels.fast_bfloat16("cpu") == expected, flags
    assert not kernels.fast_bfloat16("meta")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "flags" in cpuinfo.read_text():
        assert "fpu" in real or "sse2" in real  # a list of x86 flags was read


def test_a_float32_kernel_block_holds_in_its_own_thread_only(monkeypatch):
    """The block's choice is per thread: another thread started inside it keeps the default."""
    import threading

    monkeypatch.setenv(kernels.KERNEL_VARIABLE, "torch")
    seen = []
    with float32_kernel("onednn"):
        worker = threading.Thread(target=lambda: seen.append(kernels.chosen_float32_kernel()))
        worker.start()
        worker.join()
        assert kernels.chosen_float32_kernel() == "onednn"
    assert seen == ["torch"] and kernels.chosen_float32_kernel() == "torch"


def test_compiles_per_shape_where_onednn_runs_the_matmul():
    weight = torch.zeros(4, 3)
    with float32_kernel("torch"):  # MKL's float32 matmul
        assert not compiles_per_shape(weight)
        assert compiles_per_shape(weight.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert compiles_per_shape(weight)
    with float32_kernel("onednn"):
        assert compiles_per_shape(weight) == uses_onednn(weight)
