"""One suite over every registered mechanism: a module joins by being registered, nothing else.

Each entry's ``Example`` (kwargs, input shapes, output shape, which dim holds the channels) drives
every check here; no test below special-cases a module by name.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import Spec

SPECS = attnzoo.list_modules()
IDS = [s.name for s in SPECS]


def build(spec: Spec, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return attnzoo.create(spec.name, **spec.example.kwargs).to(dtype)


def inputs(spec: Spec, dtype: torch.dtype = torch.float32, seed: int = 1, batch: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    shapes = [((batch,) + s[1:]) if batch is not None else s for s in spec.example.inputs]
    return [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]


def run(module: nn.Module, xs):
    out = module(*xs)
    assert isinstance(out, torch.Tensor), f"canonical modules return one tensor, got {type(out).__name__}"
    return out


def randomize_buffers(module: nn.Module) -> None:
    """Give BatchNorm-like statistics non-trivial values so eval mode exercises them."""
    for name, buf in module.named_buffers():
        if buf.is_floating_point() and "running_var" in name:
            buf.uniform_(0.5, 1.5)
        elif buf.is_floating_point() and "running_mean" in name:
            buf.normal_(0, 0.1)


pytestmark = pytest.mark.skipif(not SPECS, reason="no mechanism is registered yet")


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_shape_and_dtype(spec, dtype):
    module = build(spec, dtype)
    out = run(module, inputs(spec, dtype))
    assert tuple(out.shape) == spec.example.output
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_backward_reaches_every_parameter(spec):
    module = build(spec).train()
    xs = [x.requires_grad_() for x in inputs(spec)]
    run(module, xs).square().mean().backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_gradcheck_float64(spec):
    module = build(spec, torch.float64).eval()
    randomize_buffers(module)
    xs = [x.requires_grad_() for x in inputs(spec, torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: run(module, a), xs, fast_mode=True, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_batch_independence(spec):
    module = build(spec, torch.float64).eval()
    randomize_buffers(module)
    xs = inputs(spec, torch.float64, batch=3)
    whole = run(module, xs)
    for i in range(3):
        alone = run(module, [x[i : i + 1] for x in xs])
        torch.testing.assert_close(whole[i : i + 1], alone, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_eval_is_deterministic(spec):
    module = build(spec).eval()
    xs = inputs(spec)
    with torch.no_grad():
        assert torch.equal(run(module, xs), run(module, xs))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_bfloat16_close_to_float32(spec):
    module = build(spec).eval()
    xs = inputs(spec)
    with torch.no_grad():
        ref = run(module, xs)
        low = run(copy.deepcopy(module).to(torch.bfloat16), [x.to(torch.bfloat16) for x in xs])
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm().clamp_min(1e-6)
    assert rel < spec.example.bf16_rtol, f"relative L2 error {rel:.3g}"


@pytest.mark.parametrize("spec", [s for s in SPECS if len(s.example.inputs[0]) == 4], ids=lambda s: s.name)
def test_channels_last_input_gives_same_result(spec):
    module = build(spec, torch.float64).eval()
    xs = inputs(spec, torch.float64)
    ref = run(module, xs)
    out = run(module, [xs[0].contiguous(memory_format=torch.channels_last), *xs[1:]])
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_state_dict_round_trip(spec):
    module = build(spec, seed=0).eval()
    randomize_buffers(module)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(spec, seed=123).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    xs = inputs(spec)
    with torch.no_grad():
        assert torch.equal(run(module, xs), run(fresh, xs))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_wrong_rank_raises_value_error(spec):
    module = build(spec).eval()
    xs = inputs(spec)
    for bad in (xs[0].flatten(1), xs[0].unsqueeze(0)):
        with pytest.raises(ValueError, match="expects"):
            module(bad, *xs[1:])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_wrong_channel_count_raises_value_error(spec):
    module = build(spec).eval()
    xs = inputs(spec)
    dim = spec.example.channel_dim
    widened = torch.cat([xs[0], xs[0].narrow(dim, 0, 1)], dim=dim)
    with pytest.raises(ValueError, match="expects"):
        module(widened, *xs[1:])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_non_real_float_input_raises_type_error(spec, dtype):
    module = build(spec).eval()
    xs = inputs(spec)
    with pytest.raises(TypeError, match="dtype"):
        module(xs[0].to(dtype), *xs[1:])


@pytest.mark.parametrize("spec", [s for s in SPECS if s.uses_attend], ids=lambda s: s.name)
def test_fused_path_equals_math_path(spec):
    module = build(spec, torch.float64).eval()
    xs = inputs(spec, torch.float64)
    with attnzoo.fused_attn(True):
        fused = run(module, xs)
    with attnzoo.fused_attn(False):
        plain = run(module, xs)
    torch.testing.assert_close(fused, plain, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_create_by_every_name(spec):
    for name in spec.all_names:
        if spec.seed_name and name == spec.seed_name:
            continue  # the seed name builds the seed class, with the seed's arguments (family tests)
        assert type(attnzoo.create(name, **spec.example.kwargs)) is spec.cls


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_repr_names_the_options_the_module_keeps(spec):
    """A printed model says how each attention was built: every example option the module keeps under
    its own name (a width, a window, a head count) appears as `name=` in its repr (its own
    `extra_repr` or a child's), where `WindowAttention(` once printed only its children."""
    module = build(spec)
    text = repr(module)
    missing = [k for k in spec.example.kwargs if k in vars(module) and f"{k}=" not in text]
    assert not missing, f"repr does not name {missing}: {text.splitlines()[0]}"
