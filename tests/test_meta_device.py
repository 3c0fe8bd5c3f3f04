"""The large-model loading recipe over every registered mechanism and every compat class: build on the
meta device, `load_state_dict(assign=True)` a real state_dict, run. The module gives the same numbers
as one built where it runs, or raises a `ValueError` that names it and its stray tensor, never garbage
(indexing with a non-persistent buffer left on meta reads uninitialised memory) and never a raw error."""

from __future__ import annotations

import inspect

import pytest
import torch
from tests.test_adversarial import CASES, Case, build, first, inputs

META = [c for c in CASES if "device" in inspect.signature(c.cls).parameters]


@pytest.mark.parametrize("case", META, ids=[c.id for c in META])
def test_built_on_meta_then_assigned_equals_or_names_the_stray_buffer(case: Case):
    real = build(case).eval()
    torch.manual_seed(0)
    lazy = case.cls(**case.example.kwargs, device="meta")
    lazy.load_state_dict(real.state_dict(), assign=True)
    lazy.eval()
    xs = inputs(case)
    with torch.no_grad():
        want = first(real(*xs))
        try:
            got = first(lazy(*xs))
        except ValueError as err:
            assert str(err).startswith(type(lazy).__name__) and "meta" in str(err), f"{case.id}: {err}"
            return
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_window_attention_names_its_meta_index():
    real = build(next(c for c in CASES if c.id == "window")).eval()
    lazy = type(real)(**next(c for c in CASES if c.id == "window").example.kwargs, device="meta")
    lazy.load_state_dict(real.state_dict(), assign=True)
    with pytest.raises(ValueError, match="relative_position_index on device meta.*build it on cpu"):
        lazy(*inputs(next(c for c in CASES if c.id == "window")))




def test_a_parameter_a_non_strict_load_leaves_on_meta_is_named_not_used():
    """A child's weight left on meta by a non-strict load made `F.linear` return uninitialised memory;
    and where the stray tensor was the module's first parameter, the message blamed the input's device."""
    import attnzoo

    real = attnzoo.compat.TimmGPSA(16, 2)
    for missing in ("proj.weight", "gating_param"):
        lazy = attnzoo.compat.TimmGPSA(16, 2, device="meta")
        state = {k: v for k, v in real.state_dict().items() if k != missing}
        lazy.load_state_dict(state, assign=True, strict=False)
        with pytest.raises(ValueError, match=f"holds {missing} on device meta and its other tensors on cpu"):
            lazy(torch.randn(1, 9, 16))


def _built_on_meta(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    if "device" in inspect.signature(case.cls).parameters:
        return case.cls(**case.example.kwargs, device="meta")
    with torch.device("meta"):
        return case.cls(**case.example.kwargs)


def _reset_every_module(module: torch.nn.Module) -> None:
    """Children first, so a parent's own `reset_parameters` may re-initialise a child's tensor it
    initialises specially (a zero-initialised last layer) after the child's default."""
    for sub in reversed(list(module.modules())):
        if callable(getattr(sub, "reset_parameters", None)):
            sub.reset_parameters()


WITH_STATE = [c for c in CASES if any(True for _ in build(c).state_dict())]


@pytest.mark.parametrize("case", WITH_STATE, ids=[c.id for c in WITH_STATE])
def test_to_empty_then_reset_parameters_initialises_every_tensor(case: Case):
    """torch's deferred-initialisation recipe (FSDP's default `param_init_fn`): build on meta,
    `to_empty(device=...)`, then `reset_parameters()` of every module. A tensor the module created in
    its constructor but no `reset_parameters` rewrites stays uninitialised memory (NaN here): a
    `gamma`, a relative-position table, a non-persistent index. Tensors that do not depend on the seed
    must come back equal to a normal construction's, random ones at the same scale."""
    first_build, second_build = build(case), case.cls(**case.example.kwargs)  # seeds 0 and whatever
    lazy = _built_on_meta(case).to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*lazy.parameters(), *lazy.buffers()]:
            tensor.fill_(float("nan") if tensor.is_floating_point() else 7)  # a bool buffer: True
    _reset_every_module(lazy)
    want, other = first_build.state_dict(), second_build.state_dict()
    for name, got in lazy.state_dict(keep_vars=True).items():
        if torch.equal(want[name], other[name]):  # fixed by the options: exactly this
            assert torch.equal(got, want[name]), f"{case.id}: {name} is not re-initialised"
        else:  # drawn at random: finite, at the normal construction's scale
            scale, drawn = want[name].abs().max(), got.detach().abs().max()
            assert torch.isfinite(got).all() and scale / 4 <= drawn <= 4 * scale, f"{case.id}: {name}"
    for name, got in lazy.named_buffers():  # non-persistent ones (index tables) too
        assert torch.equal(got, dict(first_build.named_buffers())[name]), f"{case.id}: buffer {name}"
    with torch.no_grad():
        assert torch.isfinite(first(lazy.eval()(*inputs(case)))).all(), case.id
