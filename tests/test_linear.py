"""altdiff's Linear: eager code is F.linear (diffusers' bits); code compiled for the CPU with autograd off
calls oneDNN through a custom op that inductor's freezing leaves alone; every linear layer of every model
is one of them. The compiled pipeline against eager, to pixels, is in test_fast_unet.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import altdiff
from altdiff import linear
from altdiff.linear import Linear

ONEDNN_OP = torch.ops.altdiff.onednn_linear.default
needs_onednn = pytest.mark.skipif(not linear.ONEDNN, reason="oneDNN linear is used on x86 CPUs with oneDNN only")


def traced_ops(fn, *args):
    """The calls in the graph dynamo traces from `fn` (no inductor, so it costs nothing)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward
    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen, out


@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
def test_eager_is_f_linear_bit_for_bit(grad_off):
    layer = Linear(320, 640)
    x = torch.randn(2, 300, 320)
    with grad_off():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_compiled_without_autograd_calls_onednn():
    layer, bias_free = Linear(320, 640), Linear(320, 64, bias=False)
    x = torch.randn(300, 2, 320).transpose(0, 1)  # a non-contiguous input
    with torch.no_grad():
        seen, (out, out_free) = traced_ops(lambda x: (layer(x), bias_free(x)), x)
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_free, F.linear(x, bias_free.weight), rtol=1e-5, atol=1e-5)
    assert seen.count(ONEDNN_OP) == 2


@pytest.mark.parametrize("case", ["grad", "bf16"])
def test_compiled_with_autograd_or_bf16_is_f_linear(case):
    layer = Linear(32, 16)
    x = torch.randn(3, 32, requires_grad=case == "grad")
    if case == "bf16":
        layer, x = layer.bfloat16(), x.bfloat16()
    with torch.no_grad() if case == "bf16" else torch.enable_grad():
        seen, out = traced_ops(layer, x)
    assert ONEDNN_OP not in seen and F.linear in seen
    if case == "grad":
        out.sum().backward()  # oneDNN's op has no backward; F.linear's does
        assert x.grad is not None and layer.weight.grad is not None


@needs_onednn
def test_inductor_freezing_compiles_a_linear_then_add():
    """Inductor's freezing pass reads `oneDNN linear + add` as a linear whose weight it packed itself and
    asserts on it: the custom op keeps the call opaque (the UNet's attention output + residual)."""
    layer = Linear(64, 64)
    x = torch.randn(2, 10, 64)
    with torch.inference_mode(), torch._inductor.config.patch(freezing=True):
        torch._dynamo.reset()
        out = torch.compile(lambda x: layer(x) + x, fullgraph=True, dynamic=False)(x)
        torch.testing.assert_close(out, layer(x) + x, rtol=1e-5, atol=1e-5)


def test_every_model_linear_is_altdiffs(tiny_folder):
    pipe = altdiff.load(tiny_folder, device="cpu")
    models = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.safety_checker)
    layers = [m for model in models for m in model.modules() if isinstance(m, nn.Linear)]
    assert layers and all(type(m) is Linear for m in layers)
