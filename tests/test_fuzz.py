"""Hypothesis fuzzing over every registered mechanism (issue 11, "Fuzzing").

Every test is parametrized by the registry (``attnzoo.list_modules()``), so a mechanism joins by
being registered; the test id names the mechanism. Four properties:

* **valid inputs** derived from the ``Example`` (random batch size, random values of small and
  large magnitude, constant and zero inputs, and random sizes along the dimensions that are free)
  give outputs of the right shape, finite, with finite gradients for the inputs and parameters;
* **invalid inputs** (wrong rank, wrong fixed size, int/bool/complex dtypes, non-tensors, empty
  batch, mismatched batch sizes between inputs, masks of the wrong shape or dtype) raise
  ``ValueError``/``TypeError`` whose message names the argument, never another exception;
* **invalid constructor arguments** (0, negatives, non-finite floats, wrong types) either build a
  module that still runs, or raise ``ValueError``/``TypeError`` naming the argument;
* **NaN in an input** is documented behaviour: no exception, the NaN reaches the outputs of the
  sample it was in, and (in eval mode) never leaks into the other samples of the batch.

Which sizes are free is registry data: `Example.free_sizes` lists groups of input dimensions that
may change together and the output dimension that follows them. A mechanism that leaves it None
falls back to `probe_free_sizes` (its layout's spatial/sequence dimensions, kept only if the module
accepts two other sizes there), so a new mechanism is fuzzed by registering alone.

The invalid-input and constructor properties also run over every compat class (`attnzoo.compat`), from
its example (`register_seed(..., example=)` or `register_compat`); their free sizes are probed along
every dimension of the first input, and their messages must name the class's own argument names.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import attnzoo
from attnzoo import Spec
from attnzoo._registry import FreeSize, compat_examples

SPECS = attnzoo.list_modules()
IDS = [s.name for s in SPECS]
# Compat classes, as Specs of layout "compat" (no layout: free sizes are probed along every dimension).
COMPAT = [Spec(f"compat.{n}", cls, "compat", "", 0, "compat", ex) for n, cls, ex in compat_examples()]
CHECKED_IDS = IDS + [s.name for s in COMPAT]
BY_NAME = {s.name: s for s in [*SPECS, *COMPAT]}

pytestmark = pytest.mark.skipif(not SPECS, reason="no mechanism is registered yet")

# ATTNZOO_FUZZ_SCALE=10 runs ten times more examples (for a long local hunt; CI keeps 1).
SCALE = float(os.environ.get("ATTNZOO_FUZZ_SCALE", "1"))
FUZZ = settings(
    max_examples=int(15 * SCALE),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    report_multiple_bugs=False,  # one failure per test, so a listed xfail is recognised
)

# Which input sizes are free is registry data (`Example.free_sizes`, `attnzoo.FreeSize`); a mechanism
# that leaves it None is probed (`probe_free_sizes`).
Group = FreeSize


# Cases known to fail, keyed by (mechanism, test kind), with the reason; empty while every
# mechanism passes.
XFAIL: dict[tuple[str, str], str] = {}

LAYOUT_FREE_DIMS = {
    "NCHW": (2, 3),
    "NHWC": (1, 2),
    "NLC": (1,),
    "NCL": (2,),
    "NCTHW": (2, 3, 4),
    "NTHWC": (1, 2, 3),
    "SEQ2SEQ": (),
}


def fail(name: str, kind: str, message: str) -> None:
    """Fail, or xfail when ``(name, kind)`` is a known, listed failure."""
    if (name, kind) in XFAIL:
        pytest.xfail(f"{XFAIL[(name, kind)]} [{message}]")
    pytest.fail(message)


def xfail_if_listed(name: str, kind: str) -> None:
    reason = XFAIL.get((name, kind))
    if reason:
        pytest.xfail(reason)


@functools.cache
def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BY_NAME[name].cls(**BY_NAME[name].example.kwargs)


def forward_params(spec: Spec) -> list[str]:
    return [p for p in inspect.signature(spec.cls.forward).parameters if p != "self"]


def input_names(spec: Spec) -> list[str]:
    return forward_params(spec)[: len(spec.example.inputs)]


def mask_names(spec: Spec) -> list[str]:
    params = inspect.signature(spec.cls.forward).parameters
    return [
        p
        for p in forward_params(spec)[len(spec.example.inputs) :]
        if "mask" in p and params[p].default is None
    ]


def make_inputs(shapes, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]


@functools.cache
def free_sizes(name: str) -> tuple[Group, ...]:
    spec = BY_NAME[name]
    if spec.example.free_sizes is not None:
        return tuple(spec.example.free_sizes)
    return tuple(probe_free_sizes(spec))


def probe_free_sizes(spec: Spec) -> list[Group]:
    """Layout-derived free dims of the first input, kept if the module accepts s+1 and 2s there."""
    ex = spec.example
    module = build(spec.name).eval()
    groups: list[Group] = []
    for dim in LAYOUT_FREE_DIMS.get(spec.layout, range(1, len(ex.inputs[0]))):
        out_dim = dim if len(ex.output) == len(ex.inputs[0]) and ex.output[dim] == ex.inputs[0][dim] else None
        ok = True
        for new in (ex.inputs[0][dim] + 1, 2 * ex.inputs[0][dim]):
            shapes = [list(s) for s in ex.inputs]
            shapes[0][dim] = new
            try:
                with torch.no_grad():
                    out = module(*make_inputs(shapes))
            except (ValueError, TypeError):
                ok = False
                break
            out = out[0] if isinstance(out, tuple) else out
            if out_dim is not None and out.shape[out_dim] != new:
                out_dim = None
        if ok:
            derived = out_dim is None and len(ex.output) == len(ex.inputs[0])
            groups.append(Group(((0, dim),), dim if derived else out_dim, derived=derived))
    return groups


def free_members(name: str) -> set[tuple[int, int]]:
    """(input, dim) pairs that may change alone (members of one-element free groups)."""
    return {g.members[0] for g in free_sizes(name) if len(g.members) == 1}


# --------------------------------------------------------------------------------------------------
# Valid inputs


def fill(shape, kind: str, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "constant":
        return torch.full(shape, scale)
    if kind == "uniform":
        return (torch.rand(shape, generator=gen) * 2 - 1) * scale
    return torch.randn(shape, generator=gen) * scale


@pytest.mark.parametrize("name", IDS)
@FUZZ
@given(data=st.data())
def test_valid_inputs_give_finite_outputs_and_gradients(name, data):
    spec = BY_NAME[name]
    xfail_if_listed(name, "valid")
    ex = spec.example
    module = build(name).train(data.draw(st.booleans(), label="train"))
    # BatchNorm in training needs two values per channel: PyTorch raises ValueError on batch 1 when
    # a BatchNorm sees (1, C, 1, 1) after pooling, so training draws batch >= 2 for those modules.
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    batch = data.draw(st.integers(2 if module.training and has_bn else 1, 3), label="batch")
    shapes = [[batch, *s[1:]] for s in ex.inputs]
    out_shape = [batch, *ex.output[1:]]
    for g in free_sizes(name):
        i0, d0 = g.members[0]
        top = max(g.low, 2 * ex.inputs[i0][d0] + 1) // g.step
        size = g.step * data.draw(
            st.integers(max(1, -(-g.low // g.step)), max(1, top)), label=f"size{g.members}"
        )
        for i, d in g.members:
            shapes[i][d] = size
        if g.out is not None:
            out_shape[g.out] = None if g.derived else size
    kind = data.draw(st.sampled_from(["normal", "uniform", "zeros", "constant"]), label="values")
    scale = data.draw(st.sampled_from([1e-4, 1e-2, 1.0, 30.0, 1e3]), label="scale")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    xs = [fill(s, kind, scale, seed + i).requires_grad_() for i, s in enumerate(shapes)]
    out = module(*xs)
    assert isinstance(out, torch.Tensor)
    assert len(out.shape) == len(out_shape), f"{name}: output rank {out.ndim}, expected {len(out_shape)}"
    got = [None if want is None else n for n, want in zip(out.shape, out_shape, strict=True)]
    assert got == out_shape, f"{name}: inputs {shapes} gave {tuple(out.shape)}, expected {out_shape}"
    assert torch.isfinite(out).all(), f"{name}: non-finite output for {kind} inputs of scale {scale}"
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), [*xs, *params], allow_unused=True)
    for g, what in zip(
        grads,
        [*input_names(spec), *(n for n, p in module.named_parameters() if p.requires_grad)],
        strict=True,
    ):
        assert g is None or torch.isfinite(g).all(), f"{name}: non-finite gradient for {what}"
    assert any(g is not None for g in grads[: len(xs)]), f"{name}: no gradient reaches the inputs"


# --------------------------------------------------------------------------------------------------
# Invalid inputs


def invalid_cases(spec: Spec) -> list[tuple[str, int]]:
    ex = spec.example
    cases: list[tuple[str, int]] = []
    for i in range(len(ex.inputs)):
        cases += [("rank_up", i), ("rank_down", i), ("dtype", i), ("not_tensor", i)]
        fixed = [d for d in range(1, len(ex.inputs[i])) if (i, d) not in free_members(spec.name)]
        cases += [("size", i * 100 + d) for d in fixed]
        if i > 0:
            cases.append(("batch_mismatch", i))
    cases.append(("empty", 0))
    for j in range(len(mask_names(spec))):
        cases += [("mask_shape", j), ("mask_dtype", j)]
    return cases


def expect_error(name: str, what: str, call, exc_types, must_name: list[str]) -> None:
    try:
        call()
    except exc_types as err:
        msg = str(err)
        assert any(n in msg for n in must_name), f"{name}: {what}: message {msg!r} names none of {must_name}"
        return
    except Exception as err:  # noqa: BLE001 - the test's point: report which exception escaped
        pytest.fail(f"{name}: {what} raised {type(err).__name__}: {err}")
    pytest.fail(f"{name}: {what} was accepted")


@pytest.mark.parametrize("name", CHECKED_IDS)
@FUZZ
@given(data=st.data())
def test_invalid_inputs_raise_value_or_type_error(name, data):
    spec = BY_NAME[name]
    ex = spec.example
    module = build(name).eval()
    names = input_names(spec)
    kind, arg = data.draw(st.sampled_from(invalid_cases(spec)), label="case")
    xfail_if_listed(name, kind)
    batch = data.draw(st.integers(1, 3), label="batch")
    shapes = [[batch, *s[1:]] for s in ex.inputs]
    xs: list[Any] = make_inputs(shapes)
    kwargs: dict[str, Any] = {}
    what = f"{kind} on argument {arg}"
    exc: tuple[type[Exception], ...] = (ValueError,)
    must = list(names)
    if kind == "rank_up":
        xs[arg] = xs[arg].unsqueeze(data.draw(st.sampled_from([0, -1])))
        must = [names[arg]]
    elif kind == "rank_down":
        xs[arg] = xs[arg].flatten(1) if data.draw(st.booleans()) else xs[arg][0]
        must = [names[arg]]
    elif kind == "size":
        i, d = divmod(arg, 100)
        shapes[i][d] += data.draw(st.integers(1, 3), label="extra")
        xs = make_inputs(shapes)
        must = list(names)  # a size shared between inputs may be reported on the other input
        what = f"wrong size {shapes[i]} for {names[i]} (dim {d})"
    elif kind == "dtype":
        dtype = data.draw(
            st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
        )
        xs[arg] = xs[arg].to(dtype)
        exc, must = (TypeError,), [names[arg]]
        what = f"{names[arg]} of dtype {dtype}"
    elif kind == "not_tensor":
        optional = inspect.signature(spec.cls.forward).parameters[names[arg]].default is None
        choices = [xs[arg].tolist(), 3.0] + ([] if optional else [None])  # None selects a default
        xs[arg] = data.draw(st.sampled_from(choices), label="value")
        exc, must = (TypeError,), [names[arg]]
        what = f"{names[arg]} given a {type(xs[arg]).__name__}"
    elif kind == "empty":
        xs = make_inputs([[0, *s[1:]] for s in shapes])
        what = "empty batch"
    elif kind == "batch_mismatch":
        shapes[arg][0] += data.draw(st.integers(1, 2))
        xs = make_inputs(shapes)
        must = [names[0], names[arg], "batch"]
        what = f"batch {shapes[arg][0]} for {names[arg]} vs {batch} for {names[0]}"
    elif kind in ("mask_shape", "mask_dtype"):
        mask = mask_names(spec)[arg]
        if kind == "mask_shape":
            rank = data.draw(st.integers(1, 5), label="mask rank")
            shape = [13] * rank  # 13 matches no size of the examples and is not 1: cannot broadcast
            kwargs[mask] = torch.ones(shape, dtype=data.draw(st.sampled_from([torch.bool, torch.float32])))
        else:
            kwargs[mask] = torch.ones(
                1, dtype=torch.complex64
            )  # int masks are legal for some (Keras casts them)
        exc, must = (ValueError, TypeError), [mask]  # masks differ in the dtypes they take
        what = f"{mask} of shape {tuple(kwargs[mask].shape)} and dtype {kwargs[mask].dtype}"
    expect_error(name, what, lambda: module(*xs, **kwargs), exc, must)


# --------------------------------------------------------------------------------------------------
# Invalid constructor arguments

BAD_SCALARS = [0, -1, -7, 2.5, float("nan"), float("inf"), "4", None, [], True]


def ctor_params(spec: Spec) -> list[str]:
    """Example kwargs plus every numeric-defaulted constructor argument."""
    names = list(spec.example.kwargs)
    for p in inspect.signature(spec.cls.__init__).parameters.values():
        default = p.default
        if p.name not in names and isinstance(default, (int, float)) and not isinstance(default, bool):
            names.append(p.name)
    return names


def bad_values(value: Any) -> list[Any]:
    bad = list(BAD_SCALARS)
    if isinstance(value, (tuple, list)) and value:
        bad += [
            (0,) * len(value),
            (-1,) * len(value),
            tuple(value[:-1]) or (1, 2, 3),
            (*value, *value),
            ("2",) * len(value),
        ]
    return bad


@pytest.mark.parametrize("name", CHECKED_IDS)
@settings(FUZZ, max_examples=int(20 * SCALE))
@given(data=st.data())
def test_bad_constructor_arguments_are_rejected_or_harmless(name, data):
    spec = BY_NAME[name]
    params = inspect.signature(spec.cls.__init__).parameters
    arg = data.draw(st.sampled_from(ctor_params(spec)), label="argument")
    current = spec.example.kwargs.get(arg, params[arg].default if arg in params else None)
    value = data.draw(st.sampled_from(bad_values(current)), label="value")
    kwargs = {**spec.example.kwargs, arg: value}
    try:
        module = spec.cls(**kwargs)
    except (ValueError, TypeError) as err:
        if arg not in str(err):
            fail(name, "ctor", f"{name}({arg}={value!r}): message {str(err)!r} does not name {arg!r}")
        return
    except Exception as err:  # noqa: BLE001
        fail(name, "ctor", f"{name}({arg}={value!r}) raised {type(err).__name__}: {err}")
    # Accepted: the module must still run on the example (or refuse its inputs cleanly).
    try:
        module.eval()
        with torch.no_grad():
            module(*make_inputs(spec.example.inputs))
    except (ValueError, TypeError):
        pass
    except Exception as err:  # noqa: BLE001
        kind = "ctor_nan" if isinstance(value, float) and math.isnan(value) else "ctor"
        fail(
            name,
            kind,
            f"{name}({arg}={value!r}) was accepted, then forward raised {type(err).__name__}: {err}",
        )


# --------------------------------------------------------------------------------------------------
# NaN


@pytest.mark.parametrize("name", IDS)
@settings(FUZZ, max_examples=int(8 * SCALE))
@given(data=st.data())
def test_nan_propagates_within_its_sample_only(name, data):
    """Documented behaviour: a NaN in one sample's input is not an error (no check scans values,
    which would cost a device sync). On the math path (``fused_attn(False)``) the NaN reaches that
    sample's output; in eval mode the other samples of the batch stay finite on either path.

    On the fused path PyTorch's CPU SDPA kernel returns 0 for a query row whose every logit is NaN,
    so a NaN that reaches only the queries (``mha``'s query, seq2seq queries) can vanish there; a
    NaN in keys or values still propagates.
    """
    spec = BY_NAME[name]
    xfail_if_listed(name, "nan")
    module = build(name).eval()
    i = data.draw(st.integers(0, len(spec.example.inputs) - 1), label="input")
    xs = make_inputs([[2, *s[1:]] for s in spec.example.inputs])
    index = tuple(data.draw(st.integers(0, n - 1)) for n in xs[i].shape[1:])
    xs[i][(0, *index)] = math.nan
    with torch.no_grad():
        fused = module(*xs)
        with attnzoo.fused_attn(False):
            out = module(*xs)
    assert torch.isnan(out[0]).any(), f"{name}: NaN in {input_names(spec)[i]}{(0, *index)} vanished"
    for result in (out, fused):
        assert torch.isfinite(result[1:]).all(), f"{name}: NaN in sample 0 leaked into sample 1"


@pytest.mark.parametrize("name", [s.name for s in SPECS if mask_names(s)])
def test_low_rank_broadcastable_masks_are_accepted(name):
    """A mask of shape (1,) or (1, 1) either runs (it broadcasts; SDPA itself rejects 1-D masks, so
    the module must reshape) or is refused with ValueError/TypeError naming the mask (modules that
    take only exact mask shapes), never another exception."""
    spec = BY_NAME[name]
    xfail_if_listed(name, "mask_low_rank")
    module = build(name).eval()
    for mask in mask_names(spec):
        for shape in ((1,), (1, 1)):
            for dtype in (torch.bool, torch.float32):
                value = torch.ones(shape, dtype=dtype) if dtype == torch.bool else torch.zeros(shape)
                try:
                    out = module(*make_inputs(spec.example.inputs), **{mask: value})
                except (TypeError, ValueError) as err:  # exact shapes / one dtype only: fine if it says so
                    assert mask in str(err), f"{name}: message {str(err)!r} does not name {mask}"
                    continue
                except Exception as err:  # noqa: BLE001
                    pytest.fail(f"{name}: {mask} {shape} of dtype {dtype} raised {type(err).__name__}: {err}")
                assert tuple(out.shape) == spec.example.output, f"{name}: {mask} {shape} {dtype}"
