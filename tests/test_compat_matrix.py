"""Checks every cell of the compatibility matrix (attnzoo.cli.matrix) for every registered mechanism.

A cell passes, or its limitation is listed with the reason in ``attnzoo.cli.matrix.LIMITATIONS``; a
listed limitation that passes fails too (strict), so the README's matrix stays true.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import attnzoo
from attnzoo.cli.matrix import applies, limitation

SPECS = attnzoo.list_modules()


def _setup(spec, dtype=torch.float32):
    torch.manual_seed(0)
    module = attnzoo.create(spec.name, **spec.example.kwargs).to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(*s, generator=gen, dtype=dtype) for s in spec.example.inputs]
    return module, xs


def _close(a, b, atol):
    torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def check_compile(spec, fullgraph: bool) -> None:
    module, xs = _setup(spec)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=fullgraph)
    with torch.no_grad():
        _close(compiled(*xs), module(*xs), 1e-4)


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
    module, xs = _setup(spec)
    with torch.no_grad():
        ref = module(*xs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(*xs)
    assert torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm().clamp_min(1e-6)
    assert rel < 0.1, f"relative error {rel:.3g} under autocast"


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
    "channels_last": lambda spec, tmp: check_channels_last(spec),
    "jit_trace": lambda spec, tmp: check_jit_trace(spec),
    "jit_script": lambda spec, tmp: check_jit_script(spec),
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
    pytest.fail(f"{spec.name} now passes {feature}: remove its entry from attnzoo.cli.matrix.LIMITATIONS")


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
