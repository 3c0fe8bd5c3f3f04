"""Checks every cell of the compatibility matrix (attnzoo.cli.matrix) for every registered mechanism.

A cell passes, or its limitation is listed with the reason (the registration's `limitations`, or
``attnzoo.cli.matrix.LIMITATIONS`` for every mechanism); a
listed limitation that passes fails too (strict), so the README's matrix stays true.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils.flop_counter import FlopCounterMode

import attnzoo
from attnzoo.cli.matrix import applies, limitation

SPECS = attnzoo.list_modules()


def _setup(spec, dtype=torch.float32):
    torch.manual_seed(0)
    module = spec.cls(**spec.example.kwargs).to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(*s, generator=gen, dtype=dtype) for s in spec.example.inputs]
    return module, xs


def _close(a, b, atol):
    torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def _grads(module, xs, run=None):
    """Output and gradients of ``sum(out**2)`` w.r.t. every input and parameter, under ``run``
    (by ``backward()``: FlopCounterMode refuses ``torch.autograd.grad``)."""
    inputs = [x.detach().clone().requires_grad_() for x in xs]
    module.zero_grad(set_to_none=True)
    out = _output((module if run is None else run)(*inputs))
    out.float().square().sum().backward()
    leaves = [*inputs, *(p for p in module.parameters() if p.requires_grad)]
    grads = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in leaves]
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


def check_compile(spec, fullgraph: bool) -> None:
    module, xs = _setup(spec)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=fullgraph)
    if fullgraph:
        with torch.no_grad():
            _close(compiled(*xs), module(*xs), 1e-4)
        return
    out, grads = _grads(module, xs, compiled)  # one joint forward+backward graph
    ref, ref_grads = _grads(module, xs)
    _close(out, ref, 1e-4)
    for g, r in zip(grads, ref_grads, strict=True):
        _close(g, r, 1e-4)


def check_double_backward(spec) -> None:
    """gradgradcheck (float64, first input), the first-order gradient with ``create_graph=True`` equal to
    the one without (gradgradcheck alone passes a consistently wrong one), and a WGAN-GP-style gradient
    penalty reaching the parameters."""
    module, xs = _setup(spec, torch.float64)
    x = xs[0].requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: _output(module(t, *xs[1:])), (x,), fast_mode=True)
    (grad_x,) = torch.autograd.grad(_output(module(x, *xs[1:])).square().sum(), x, create_graph=True)
    (plain,) = torch.autograd.grad(_output(module(x, *xs[1:])).square().sum(), x)
    _close(grad_x, plain, 1e-10)
    grad_x.norm().backward()
    params = [p for p in module.parameters() if p.requires_grad]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    assert not params or any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def check_flop_counter(spec) -> None:
    """Forward and backward under FlopCounterMode: FLOPs counted, the same gradients as outside it."""
    module, xs = _setup(spec)
    with FlopCounterMode(display=False) as counter:
        out, grads = _grads(module, xs)
    ref, ref_grads = _grads(module, xs)
    # FlopCounterMode counts matrix products and convolutions (not FFTs or element-wise gates): a module
    # with a linear map or a convolution must show some.
    counted = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    if any(isinstance(m, counted) for m in module.modules()):
        assert counter.get_total_flops() > 0
    _close(out, ref, 1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        _close(g, r, 1e-5)


def check_torch_func(spec) -> None:
    """torch.func.grad over torch.func.functional_call equals eager autograd, and so does torch.func.grad
    of the inputs alone while the module holds parameters that require grad (a relative position bias
    built from them reached the CPU flash kernel, which refused it)."""
    module, xs = _setup(spec)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

    def loss(p, inputs):
        return _output(torch.func.functional_call(module, p, tuple(inputs))).square().sum()

    grad_p, grad_x = torch.func.grad(loss, argnums=(0, 1))(params, xs)
    _, ref = _grads(module, xs)
    for g, r in zip([*grad_x, *(grad_p[n] for n in names)], ref, strict=True):
        _close(g, r, 1e-5)
    grad_only = torch.func.grad(lambda inputs: _output(module(*inputs)).square().sum())(list(xs))
    for g, r in zip(grad_only, ref[: len(xs)], strict=True):
        _close(g, r, 1e-5)


def check_forward_ad(spec) -> None:
    """Forward-mode derivatives of the output along a random input tangent, by `torch.func.jvp` and by
    dual tensors, equal the Jacobian-vector product that reverse mode gives twice (in float64)."""
    module, xs = _setup(spec, torch.float64)
    tangent = torch.randn(xs[0].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    run = lambda x0: _output(module(x0, *xs[1:]))  # noqa: E731
    _, by_func = torch.func.jvp(run, (xs[0],), (tangent,))
    with fwAD.dual_level():
        by_dual = fwAD.unpack_dual(run(fwAD.make_dual(xs[0], tangent))).tangent
    x0 = xs[0].clone().requires_grad_()
    out = run(x0)
    probe = torch.zeros_like(out, requires_grad=True)  # J t = d/du <J^T u, t>
    (vjp,) = torch.autograd.grad(out, x0, probe, create_graph=True)
    (expected,) = torch.autograd.grad((vjp * tangent).sum(), probe)
    _close(by_func, expected, 1e-8)
    _close(by_dual, expected, 1e-8)


def check_onnx(spec, tmp_path) -> None:
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
        pytest.skip("onnx export needs onnx, onnxscript and onnxruntime (installed in CI)")
    import onnxruntime as ort

    module, xs = _setup(spec)
    path = tmp_path / f"{spec.name}.onnx"
    torch.onnx.export(module, tuple(xs), str(path), opset_version=18, dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs, strict=True)}
    got = torch.from_numpy(session.run(None, feeds)[0])
    with torch.no_grad():
        _close(got, module(*xs), 1e-4)


def check_autocast_bf16(spec) -> None:
    """Forward and backward under CPU autocast: close to float32 (gradients of inputs and
    parameters compared together, relative to their joint norm)."""
    module, xs = _setup(spec)
    ref, ref_grads = _grads(module, xs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _grads(module, xs)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    rel = (out.float() - ref).norm() / ref.norm().clamp_min(1e-6)
    assert rel < 0.1, f"relative error {rel:.3g} under autocast"
    flat = torch.cat([g.float().flatten() for g in grads])
    flat_ref = torch.cat([g.flatten() for g in ref_grads])
    rel = (flat - flat_ref).norm() / flat_ref.norm().clamp_min(1e-6)
    assert rel < 0.1, f"gradient relative error {rel:.3g} under autocast"


def check_channels_last(spec) -> None:
    module, xs = _setup(spec, torch.float64)
    ref = module(*xs)
    module = copy.deepcopy(module).to(memory_format=torch.channels_last)
    out = module(xs[0].contiguous(memory_format=torch.channels_last), *xs[1:])
    _close(out, ref, 1e-10)


def check_jit_trace(spec) -> None:
    module, xs = _setup(spec)
    with torch.no_grad():
        traced = torch.jit.trace(module, tuple(xs), check_trace=False)
        fresh = [torch.randn_like(x) for x in xs]
        _close(traced(*fresh), module(*fresh), 1e-5)


class _Holder(torch.nn.Module):
    """A model holding the module, as a traced model does (FX traces a fixed number of inputs)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class _Holder2(_Holder):
    def forward(self, x, y):
        return self.inner(x, y)


class _Holder3(_Holder):
    def forward(self, x, y, z):
        return self.inner(x, y, z)


def check_fx(module, xs) -> None:
    """`torch.fx.symbolic_trace` of a model holding the module records it as one call_module node (as
    torch's own modules are) and the traced model equals eager."""
    traced = torch.fx.symbolic_trace((_Holder, _Holder2, _Holder3)[len(xs) - 1](module))
    calls = [n for n in traced.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["inner"], traced.graph
    with torch.no_grad():
        torch.testing.assert_close(traced(*xs), module(*xs), atol=0, rtol=0)


def check_jit_script(spec) -> None:
    module, xs = _setup(spec)
    scripted = torch.jit.script(module)
    with torch.no_grad():
        _close(scripted(*xs), module(*xs), 1e-5)


CHECKS = {
    "compile": lambda spec, tmp: check_compile(spec, fullgraph=False),
    "fullgraph": lambda spec, tmp: check_compile(spec, fullgraph=True),
    "onnx": check_onnx,
    "autocast_bf16": lambda spec, tmp: check_autocast_bf16(spec),
    "double_backward": lambda spec, tmp: check_double_backward(spec),
    "flop_counter": lambda spec, tmp: check_flop_counter(spec),
    "torch_func": lambda spec, tmp: check_torch_func(spec),
    "forward_ad": lambda spec, tmp: check_forward_ad(spec),
    "channels_last": lambda spec, tmp: check_channels_last(spec),
    "jit_trace": lambda spec, tmp: check_jit_trace(spec),
    "jit_script": lambda spec, tmp: check_jit_script(spec),
    "fx": lambda spec, tmp: check_fx(*_setup(spec)),
}

CASES = [(s, f) for s in SPECS for f in CHECKS if applies(s, f)]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("spec, feature", CASES, ids=[f"{s.name}-{f}" for s, f in CASES])
def test_matrix_cell(spec, feature, tmp_path):
    why = limitation(spec.name, feature)
    if why is None:
        CHECKS[feature](spec, tmp_path)
        return
    try:
        CHECKS[feature](spec, tmp_path)
    except pytest.skip.Exception:
        raise
    except Exception:
        pytest.xfail(f"documented limitation: {why}")
    pytest.fail(f"{spec.name} now passes {feature}: remove the limitation from its registration "
                    "(or from attnzoo.cli.matrix.LIMITATIONS)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA half precision needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_cuda_half_precision(spec, dtype):
    module, xs = _setup(spec)
    ref = module(*xs)
    module = module.cuda().to(dtype)
    out = module(*[x.cuda().to(dtype) for x in xs]).float().cpu()
    rel = (out - ref).norm() / ref.norm().clamp_min(1e-6)
    assert torch.isfinite(out).all() and rel < 0.1
