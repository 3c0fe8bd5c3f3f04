"""The hostile user's sweep, exhaustive where `tests/test_fuzz.py` samples: every numeric and tuple
option of every registered mechanism and compat class (its example's value or its default) given nearby,
zero, negative and mistyped values, forward size arguments given non-sizes, and wrong masks. Each either
builds a module whose example runs to a finite output, or raises `ValueError`/`TypeError` whose message
names the class's own argument (never an argument it does not take); never an error from inside torch.
Cases and helpers are `tests/test_adversarial.py`'s."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from tests.test_adversarial import CASES, IDS, Case, accepted_mask, first, inputs, mask_names

F32 = torch.float32


def option_values(case: Case) -> dict[str, object]:
    """Every constructor option with a value to start from: the example's, else the default."""
    params = list(inspect.signature(case.cls.__init__).parameters.values())[1:]
    found = {}
    for p in params:
        value = case.example.kwargs.get(p.name, p.default)
        if p.name not in ("device", "dtype") and value is not inspect.Parameter.empty:
            found[p.name] = value
    return found


def refused_by_name_or_runs(case: Case, name: str, value: object) -> None:
    """Build with `name=value`: a refusal names `name` (and hints only at arguments the class takes),
    an accepted value gives a module whose example runs finite or is refused by a ValueError/TypeError."""
    params = inspect.signature(case.cls.__init__).parameters
    what = f"{case.id}({name}={value!r})"
    try:
        torch.manual_seed(0)
        module = case.cls(**{**case.example.kwargs, name: value})
    except (ValueError, TypeError) as err:
        assert name in str(err), f"{what}: message {str(err)!r} does not name {name}"
        hint = re.search(r"\(or give (\w+)\)", str(err))
        assert hint is None or hint.group(1) in params, f"{what}: hints at {hint.group(1)}, no argument"
        return
    try:
        with torch.no_grad():
            out = first(module.eval()(*inputs(case)))
    except (ValueError, TypeError):
        return
    assert not out.is_floating_point() or torch.isfinite(out).all(), f"{what}: non-finite output"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_integer_options_near_zero_and_off_by_one(case):
    """`num_heads` that does not divide the width, a width one off, 1 and 3: the message names the
    argument as the class spells it (`in_features`, `hidden_dim`, `dim_out`), where it once said `dim`
    and suggested a `head_dim` the class does not take."""
    for name, value in option_values(case).items():
        if isinstance(value, int) and not isinstance(value, bool):
            for bad in (value + 1, 1, 3, 0, -1):
                refused_by_name_or_runs(case, name, bad)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float_options_at_zero_and_below(case):
    """timm's `AttentionPoolLatent(mlp_ratio=-0.5)` failed inside torch with a negative width, and
    `LiteMLA(eps=0)` divided 0 by 0 for any query whose ReLU features are all zero."""
    for name, value in option_values(case).items():
        if isinstance(value, float):
            for bad in (0.0, -0.5):
                refused_by_name_or_runs(case, name, bad)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tuple_options_given_scalars_or_ones(case):
    """A scalar where a tuple is expected failed iterating (`'int' object is not iterable`, naming no
    argument: `LiteMLA(scales=1)`); MViT's `feat_size=(1, 1)` under strides of 2 built empty position
    tables inside torch."""
    for name, value in option_values(case).items():
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
            for bad in (None, 2.5, True, "2", (1,) * len(value), (0,) * len(value)):
                refused_by_name_or_runs(case, name, bad)


SIZED = [c for c in CASES if {"size", "feat_size"} & set(inspect.signature(c.cls.forward).parameters)]


@pytest.mark.parametrize("case", SIZED, ids=lambda c: c.id)
def test_forward_size_arguments_refuse_non_sizes_by_name(case):
    module = case.cls(**case.example.kwargs).eval()
    name = "feat_size" if "feat_size" in inspect.signature(case.cls.forward).parameters else "size"
    for bad in (3.0, torch.ones(()), (0, 0), (-1, -4), (4.0, 4.0), (1, 2, 3)):
        with pytest.raises((ValueError, TypeError), match=name):
            module(*inputs(case), **{name: bad})


MASKED = [c for c in CASES if mask_names(c)]


@pytest.mark.parametrize("case", MASKED, ids=lambda c: c.id)
def test_wrong_masks_are_refused_by_the_class_called(case):
    """SelfAttentionBlock's masks were checked by the KerasMultiHeadAttention inside it, whose name the
    user never wrote."""
    module = case.cls(**case.example.kwargs).eval()
    who = type(module).__name__
    for name in mask_names(case):
        shape, taken = accepted_mask(module, case, name)
        dtype = torch.bool if torch.bool in taken else F32
        wrong = (*shape[:-1], shape[-1] + 1)  # one key too many: broadcasts to nothing
        for bad in (torch.ones(wrong, dtype=dtype), torch.ones(shape, dtype=torch.complex64)):
            with pytest.raises((ValueError, TypeError), match=rf"^{who}\b.*{name}"):
                module(*inputs(case), **{name: bad})
