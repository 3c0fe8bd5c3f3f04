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


# ---------------------------------------------------------------------------------------------
# Memory layouts, the meta device, half precision, large values, switch and option types


def views(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """`x`'s values in other memory layouts: a transposed copy, a strided slice, channels_last."""
    big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    big[..., ::2] = x
    found = {"transposed": x.transpose(-1, -2).contiguous().transpose(-1, -2), "strided": big[..., ::2]}
    if x.ndim in (4, 5):
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        found["channels_last"] = x.contiguous(memory_format=fmt)
    return found


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_strided_and_expanded_inputs_give_the_contiguous_result(case):
    module = build(case).double().eval()
    xs = inputs(case, torch.float64)
    with torch.no_grad():
        ref = first(module(*xs))
        for i, x in enumerate(xs):
            for kind, view in views(x).items():
                out = first(module(*xs[:i], view, *xs[i + 1:]))
                msg = f"{case.id}: {kind} input {i}"
                torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10, msg=msg)
        expanded = [x[:1].expand(x.shape) for x in xs]  # stride 0 along the batch
        out = first(module(*expanded))
        torch.testing.assert_close(out, first(module(*[x.contiguous() for x in expanded])), atol=1e-10,
                                   rtol=1e-10, msg=f"{case.id}: expanded inputs")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_module_on_meta_runs_on_meta_inputs(case):
    """Shape inference: a module built on meta takes meta inputs and reads no value on the way."""
    if "device" not in inspect.signature(case.cls.__init__).parameters:
        module = build(case).to("meta").eval()
    else:
        module = build(case, device="meta").eval()
    out = first(module(*inputs(case, device="meta")))
    assert out.device.type == "meta" and tuple(out.shape) == case.example.output, case.id


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float16_on_cpu_is_finite_or_refused(case):
    module = build(case).half().eval()
    try:
        with torch.no_grad():
            out = first(module(*inputs(case, torch.float16)))
    except (TypeError, ValueError) as err:
        assert "float16" in str(err) or "Half" in str(err), f"{case.id}: {err}"
        return
    assert out.dtype == torch.float16 and torch.isfinite(out).all(), f"{case.id}: non-finite float16 output"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_large_inputs_give_finite_outputs(case):
    """Inputs of size 1e4: every softmax and normalisation stays finite in float32."""
    module = build(case).eval()
    with torch.no_grad():
        out = first(module(*[x * 1e4 for x in inputs(case)]))
    assert torch.isfinite(out).all(), f"{case.id}: non-finite output for inputs of size 1e4"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_batch_of_one_with_one_pixel_runs_or_names_the_module(case):
    """Batch 1 of 1x1 maps in training: BatchNorm inside refuses one value per channel; the error names
    the module and its input, never only torch's message. Sizes too small for a window are refused
    by the module itself."""
    module = build(case).train()
    xs = inputs(case)
    shape = list(xs[0].shape)
    shape[0] = 1
    for d in range(1, len(shape)):
        if shape[d] != case.example.kwargs.get(case.width, -1):  # every size but the channels
            shape[d] = 1
    try:
        out = first(module(torch.randn(shape), *[x[:1] for x in xs[1:]]))
    except (TypeError, ValueError) as err:
        assert str(err).startswith(type(module).__name__), f"{case.id}: {err}"
        return
    assert torch.isfinite(out).all(), case.id


def switches(case: Case) -> list[str]:
    params = list(inspect.signature(case.cls.forward).parameters.values())[1:]
    return [p.name for p in params if p.annotation == "bool" and p.kind != p.POSITIONAL_ONLY]


SWITCHED = [s for s in attnzoo.list_modules() if switches(Case(s.name, s.cls, s.example))]


@pytest.mark.parametrize("spec", SWITCHED, ids=lambda s: s.name)
def test_forward_switches_take_bools_only(spec):
    """`need_weights="no"` is truthy: a canonical class refuses it rather than returning a tuple.
    (Compat classes take what their originals took: torch's `need_weights=0` included.)"""
    case = Case(spec.name, spec.cls, spec.example)
    module = build(case).eval()
    for name in switches(case):
        for bad in ("no", 1, None):
            with pytest.raises(TypeError, match=rf"{name} must be a bool, got {type(bad).__name__}"):
                module(*inputs(case), **{name: bad})


LAYER_ANNOTATIONS = ("type[nn.Module]", "type[nn.Module] | None", "Callable[..., nn.Module]",
                     "Callable[..., nn.Module] | None", "Layer", "Layer | None")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_module_building_options_reject_non_callables(case):
    for name in [n for a in LAYER_ANNOTATIONS for n in annotated(case, a)]:
        for bad in (0, "BatchNorm2d", True):
            with pytest.raises(TypeError, match=rf"{name} must be an nn.Module class"):
                build(case, **{name: bad})


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float_options_reject_inf_and_nan(case):
    infinite = getattr(case.cls, "infinite_options", ())  # options where math.inf means something
    for name in annotated(case, "float") + annotated(case, "float | None") + annotated(case, "int | float"):
        for bad in (float("inf"), float("-inf"), float("nan")):
            if name in infinite and bad == float("inf"):
                assert torch.isfinite(first(build(case, **{name: bad}).eval()(*inputs(case)))).all()
                continue
            with pytest.raises(ValueError, match=rf"{name} must be"):
                build(case, **{name: bad})


SPATIAL = {"NCHW": (2, 3), "NHWC": (1, 2), "NTHWC": (1, 2, 3), "NLC": (1,)}
MAPS = [s for s in attnzoo.list_modules() if s.layout in SPATIAL]


@pytest.mark.parametrize("spec", MAPS, ids=lambda s: s.name)
@pytest.mark.parametrize("size", [1, 2, 7, 13])
def test_small_odd_and_prime_sizes_run_or_are_refused(spec, size):
    """H != W, prime sizes, 1x1 and sizes below a window, kernel, stride or pool: a finite output or a
    ValueError from the module itself (its own name first), never an error from deep inside torch."""
    case = Case(spec.name, spec.cls, spec.example)
    module = build(case).eval()
    xs = inputs(case)
    shape = list(xs[0].shape)
    for j, d in enumerate(SPATIAL[spec.layout]):
        shape[d] = size if j % 2 == 0 else 2 * size + 1  # (1, 3), (7, 15), ...: never square
    try:
        with torch.no_grad():
            out = first(module(torch.randn(shape), *xs[1:]))
    except ValueError as err:
        assert str(err).startswith(type(module).__name__), f"{spec.name}: {err}"
        return
    assert torch.isfinite(out).all() and out.shape[0] == shape[0], spec.name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_device_and_dtype_options_are_checked_before_allocation(case):
    """`dtype=torch.int64` would fail deep in a parameter's init, `dtype=torch.complex64` would build a
    module no forward accepts, `device="gpu"` would fail in torch's device parser."""
    params = inspect.signature(case.cls.__init__).parameters
    for bad in (torch.int64, torch.complex64, "float32") if "dtype" in params else ():
        with pytest.raises(TypeError, match=r"dtype must be a floating-point torch.dtype"):
            build(case, dtype=bad)
    if "device" in params:
        with pytest.raises(ValueError, match=r"device='gpu' names no device"):
            build(case, device="gpu")
        with pytest.raises(TypeError, match=r"device must be a torch.device"):
            build(case, device=1.5)
