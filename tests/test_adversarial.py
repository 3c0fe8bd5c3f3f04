"""The hostile user's sweep, over every registered mechanism and every compat class: inputs of
another dtype or device, options of the wrong type, `None` where a value is required, unknown option
strings and keywords, and masks that block whole rows. Every case raises `ValueError`/`TypeError`
naming what was expected and what was given (with the class's own argument names), before any work,
or (fully masked rows) gives finite outputs and gradients.
A mechanism joins by being registered, a compat class by its example (`register_seed(..., example=)`
or `register_compat`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import attnzoo
import attnzoo.compat
from attnzoo._registry import Example, compat_examples

# Exports of attnzoo.compat that are functions, not classes, and have no example, with the reason.
EXEMPT = {
    "self_attention": "a builder function: it returns the registered SelfAttentionBlock (swept as "
    "self_attention_block); its options are the block's",
    "cross_attention": "a builder function: it returns the registered CrossAttentionBlock (swept as "
    "cross_attention_block); its options are the block's",
    "feed_forward": "a builder function returning a plain feed-forward block (no attention, no masks)",
}


@dataclass(frozen=True)
class Case:
    """One class to sweep: a registered canonical class or a compat class, with its example."""

    id: str
    cls: Callable[..., torch.nn.Module]
    example: Example

    @property
    def width(self) -> str:
        params = list(inspect.signature(self.cls.__init__).parameters)[1:]
        return params[0] if params else ""


CASES = [Case(s.name, s.cls, s.example) for s in attnzoo.list_modules()]
CASES += [Case(f"compat.{name}", cls, example) for name, cls, example in compat_examples()]
IDS = [c.id for c in CASES]


def test_every_compat_class_has_an_example():
    swept = {c.id.removeprefix("compat.") for c in CASES if c.id.startswith("compat.")}
    missing = sorted(set(attnzoo.compat.__all__) - swept - set(EXEMPT))
    assert not missing, f"compat classes without an example (register_seed/register_compat): {missing}"
    assert all(not isinstance(getattr(attnzoo.compat, name), type) for name in EXEMPT)
    assert not swept & set(EXEMPT)


def build(case: Case, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return case.cls(**{**case.example.kwargs, **overrides})


def inputs(case: Case, dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*s, generator=gen, dtype=dtype).to(device) for s in case.example.inputs]


def options(case: Case) -> dict[str, inspect.Parameter]:
    params = list(inspect.signature(case.cls.__init__).parameters.values())[1:]
    return {p.name: p for p in params if p.name not in ("device", "dtype")}


def annotated(case: Case, annotation: str) -> list[str]:
    return [n for n, p in options(case).items() if p.annotation == annotation]


def mask_names(case: Case) -> list[str]:
    params = list(inspect.signature(case.cls.forward).parameters.values())[1 + len(case.example.inputs):]
    return [p.name for p in params if "mask" in p.name and p.default is None]


def first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def test_examples_run_and_give_their_output_shape():
    for case in CASES:
        with torch.no_grad():
            out = first(build(case).eval()(*inputs(case)))
        assert tuple(out.shape) == case.example.output, case.id


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_input_of_another_dtype_names_both_dtypes(case, dtype):
    module = build(case).eval()
    if not any(p.is_floating_point() for p in module.parameters()):  # nothing to disagree with
        assert first(module(*inputs(case, dtype))).dtype == dtype, f"{case.id} changed the input's dtype"
        return
    with pytest.raises(TypeError, match=rf"dtype.*{dtype}|{dtype}.*dtype"):
        module(*inputs(case, dtype))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_input_on_another_device_names_both_devices(case):
    module = build(case).eval()
    xs = inputs(case)
    if len(xs) == 1 and not any(True for _ in module.parameters()):  # it runs where its input is
        assert first(module(xs[0].to("meta"))).device.type == "meta", case.id
        return
    names = [p for p in inspect.signature(case.cls.forward).parameters if p != "self"]
    for i in range(len(xs)):
        moved = [x.to("meta") if j == i else x for j, x in enumerate(xs)]
        with pytest.raises(ValueError, match=rf"{names[i]}.*device.*meta|meta.*device.*{names[i]}"):
            module(*moved)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_module_on_meta_gets_a_clear_error_for_cpu_inputs(case):
    if "device" not in inspect.signature(case.cls.__init__).parameters:
        module = build(case).to("meta").eval()
    else:
        module = build(case, device="meta").eval()
    if not any(True for _ in module.parameters()):  # holds nothing on meta: it runs where its input is
        assert first(module(*inputs(case))).device.type == "cpu", case.id
        return
    with pytest.raises(ValueError, match="device"):
        module(*inputs(case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_boolean_options_reject_strings_and_ints(case):
    for name in annotated(case, "bool"):
        for bad in ("False", 0, None):
            with pytest.raises(TypeError, match=rf"{name} must be a bool, got"):
                build(case, **{name: bad})


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_integer_options_reject_floats_strings_and_none(case):
    for name in annotated(case, "int") + [n for n in annotated(case, "int | None") if n != case.width]:
        for bad in (2.5, "2", True):
            with pytest.raises(TypeError, match=rf"{name} must be an int"):
                build(case, **{name: bad})
    for name in annotated(case, "int"):
        with pytest.raises(TypeError, match=rf"{name} must be an int, got NoneType"):
            build(case, **{name: None})


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float_options_reject_strings(case):
    for name in annotated(case, "float") + annotated(case, "float | None"):
        with pytest.raises(TypeError, match=rf"{name} must be a number"):
            build(case, **{name: "0.1"})


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unknown_option_strings_are_refused_by_name(case):
    for name in annotated(case, "str"):
        with pytest.raises((ValueError, TypeError), match=name):
            build(case, **{name: "no such option!"})


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unknown_keyword_is_refused(case):
    with pytest.raises(TypeError, match="no_such_argument"):
        build(case, no_such_argument=1)


def accepted_mask(module, case: Case, name: str) -> tuple[tuple[int, ...], set[torch.dtype]]:
    """A mask shape the module takes, and which of bool/float it takes, found by trying the usual
    shapes with masks that block nothing."""
    xs = inputs(case)
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
    pytest.fail(f"{case.id}: no usual shape of {name} is accepted")


# A fully blocking mask in each convention: bool False (SDPA: True = may attend; the seed's 0 = masked),
# bool True (torch's nn.MultiheadAttention: True = may not attend), -inf added to the logits, and the
# seed's float 0 (entries equal to 0 are masked). Whatever a class's convention, each must stay finite.
BLOCKING = {
    "bool_false": lambda shape: torch.zeros(shape, dtype=torch.bool),
    "bool_true": lambda shape: torch.ones(shape, dtype=torch.bool),
    "float_-inf": lambda shape: torch.full(shape, float("-inf")),
    "float_zero": lambda shape: torch.zeros(shape),
}


@pytest.mark.parametrize("case", [c for c in CASES if mask_names(c)], ids=lambda c: c.id)
@pytest.mark.parametrize("kind", list(BLOCKING))
@pytest.mark.parametrize("fused", [True, False])
def test_fully_masked_rows_give_finite_outputs_and_gradients(case, kind, fused):
    module = build(case).train(False)
    xs = [x.requires_grad_() for x in inputs(case)]
    for name in mask_names(case):
        shape, taken = accepted_mask(module, case, name)
        blocked = BLOCKING[kind](shape)
        if blocked.dtype not in taken:
            continue  # this mask takes the other kind only (its message said so above)
        with attnzoo.fused_attn(fused):
            out = first(module(*xs, **{name: blocked}))
        assert torch.isfinite(out).all(), f"{case.id}: a fully masked {name} ({kind}) gave non-finite outputs"
        out.square().sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in xs), f"{case.id}: non-finite input gradients"
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters()), (
            f"{case.id}: non-finite parameter gradients for a fully masked {name} ({kind})"
        )


@pytest.mark.parametrize("case", [c for c in CASES if mask_names(c)], ids=lambda c: c.id)
def test_mask_on_another_device_names_the_mask(case):
    module = build(case).eval()
    for name in mask_names(case):
        shape, taken = accepted_mask(module, case, name)
        mask = (torch.ones(shape, dtype=torch.bool) if torch.bool in taken else torch.zeros(shape)).to("meta")
        with pytest.raises(ValueError, match=rf"{name} on device cpu .*got meta"):
            module(*inputs(case), **{name: mask})
