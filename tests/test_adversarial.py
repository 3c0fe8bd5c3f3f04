"""The hostile user's sweep, over every registered mechanism: inputs of another dtype or device,
options of the wrong type, `None` where a value is required, unknown option strings, and masks that
block whole rows. Every case raises `ValueError`/`TypeError` naming what was expected and what was
given, before any work, or (fully masked rows) gives finite outputs and gradients.
A mechanism joins by being registered."""

from __future__ import annotations

import inspect

import pytest
import torch

import attnzoo
from attnzoo import Spec

SPECS = attnzoo.list_modules()
IDS = [s.name for s in SPECS]


def build(spec: Spec, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return spec.cls(**{**spec.example.kwargs, **overrides})


def inputs(spec: Spec, dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*s, generator=gen, dtype=dtype).to(device) for s in spec.example.inputs]


def options(spec: Spec) -> dict[str, inspect.Parameter]:
    params = list(inspect.signature(spec.cls.__init__).parameters.values())[1:]
    return {p.name: p for p in params if p.name not in ("device", "dtype")}


def annotated(spec: Spec, annotation: str) -> list[str]:
    return [n for n, p in options(spec).items() if p.annotation == annotation]


def mask_names(spec: Spec) -> list[str]:
    params = list(inspect.signature(spec.cls.forward).parameters.values())[1 + len(spec.example.inputs):]
    return [p.name for p in params if "mask" in p.name and p.default is None]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_input_of_another_dtype_names_both_dtypes(spec, dtype):
    module = build(spec).eval()
    if not any(p.is_floating_point() for p in module.parameters()):
        pytest.skip(f"{spec.name} has no parameters: it runs in its input's dtype")
    with pytest.raises(TypeError, match=rf"dtype.*{dtype}|{dtype}.*dtype"):
        module(*inputs(spec, dtype))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_input_on_another_device_names_both_devices(spec):
    module = build(spec).eval()
    if not any(True for _ in (*module.parameters(), *module.buffers())):
        pytest.skip(f"{spec.name} holds no tensors: it runs wherever its input is")
    xs = inputs(spec)
    with pytest.raises(ValueError, match="device.*meta|meta.*device"):
        module(xs[0].to("meta"), *xs[1:])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_module_on_meta_gets_a_clear_error_for_cpu_inputs(spec):
    module = build(spec, device="meta").eval()
    if not any(True for _ in (*module.parameters(), *module.buffers())):
        pytest.skip(f"{spec.name} holds no tensors: it runs wherever its input is")
    with pytest.raises(ValueError, match="device"):
        module(*inputs(spec))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_boolean_options_reject_strings_and_ints(spec):
    for name in annotated(spec, "bool"):
        for bad in ("False", 0, None):
            with pytest.raises(TypeError, match=rf"{name} must be a bool, got"):
                build(spec, **{name: bad})


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_integer_options_reject_floats_strings_and_none(spec):
    for name in annotated(spec, "int") + [n for n in annotated(spec, "int | None") if n != spec.width]:
        for bad in (2.5, "2", True):
            with pytest.raises(TypeError, match=rf"{name} must be an int"):
                build(spec, **{name: bad})
    for name in annotated(spec, "int"):
        with pytest.raises(TypeError, match=rf"{name} must be an int, got NoneType"):
            build(spec, **{name: None})


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_float_options_reject_strings(spec):
    for name in annotated(spec, "float") + annotated(spec, "float | None"):
        with pytest.raises(TypeError, match=rf"{name} must be a number"):
            build(spec, **{name: "0.1"})


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_unknown_option_strings_are_refused_by_name(spec):
    for name in annotated(spec, "str"):
        with pytest.raises((ValueError, TypeError), match=name):
            build(spec, **{name: "no such option!"})


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_unknown_keyword_is_refused(spec):
    with pytest.raises(TypeError, match="no_such_argument"):
        build(spec, no_such_argument=1)


def accepted_mask(module, spec: Spec, name: str) -> tuple[tuple[int, ...], set[torch.dtype]]:
    """A mask shape the module takes, and which of bool/float it takes, found by trying the usual
    shapes with masks that block nothing."""
    xs = inputs(spec)
    b, length = xs[0].shape[0], xs[0].shape[1]
    keys = sorted({x.shape[1] for x in xs[1:]} or {length})
    windows = [(n, length, length) for n in range(1, b + 1) if b % n == 0]
    shapes = [(b, k) for k in keys] + [(b, length, k) for k in keys] + [(length, k) for k in keys]
    for shape in [*shapes, (b, 1, length, keys[0]), *windows, (1,)]:
        taken = set()
        for free in (torch.ones(shape, dtype=torch.bool), torch.zeros(shape)):
            try:
                with torch.no_grad():
                    module(*xs, **{name: free})
            except (ValueError, TypeError):
                continue
            taken.add(free.dtype)
        if taken:
            return shape, taken
    pytest.fail(f"{spec.name}: no usual shape of {name} is accepted")


@pytest.mark.parametrize("spec", [s for s in SPECS if mask_names(s)], ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("fused", [True, False])
def test_fully_masked_rows_give_finite_outputs_and_gradients(spec, kind, fused):
    module = build(spec).train(False)
    xs = [x.requires_grad_() for x in inputs(spec)]
    for name in mask_names(spec):
        shape, taken = accepted_mask(module, spec, name)
        blocked = torch.zeros(shape, dtype=torch.bool) if kind == "bool" else torch.full(shape, float("-inf"))
        if blocked.dtype not in taken:
            continue  # this mask takes the other kind only (its message said so above)
        with attnzoo.fused_attn(fused):
            out = module(*xs, **{name: blocked})
        out = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(out).all(), f"{spec.name}: a fully masked {name} gave non-finite outputs"
        out.square().sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in xs), f"{spec.name}: non-finite input gradients"
