"""Every canonical constructor against the vocabulary table of docs/conventions.md, and torch's
module conventions (`device=`, `dtype=`, working defaults) for every registered mechanism."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import attnzoo

ROOT = Path(__file__).resolve().parents[1]
SPECS = attnzoo.list_modules()
IDS = [s.name for s in SPECS]
FIRST = {
    "NCHW": "channels", "NCL": "channels", "NCTHW": "channels", "NLC": "dim", "NHWC": "dim", "NTHWC": "dim",
}


def vocabulary() -> dict[str, set[str] | None]:
    """argument -> the mechanisms it is specific to, or None when shared."""
    text = (ROOT / "docs" / "conventions.md").read_text()
    body = text.split("<!-- vocabulary:start -->")[1].split("<!-- vocabulary:end -->")[0]
    table: dict[str, set[str] | None] = {}
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        used_by = cells[2]
        table[name] = None if used_by == "shared" else set(re.findall(r"`?([a-z0-9_]+)`?", used_by))
    return table


def parameters(spec) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(spec.cls.__init__).parameters.values() if p.name != "self"]


def test_the_table_parses():
    table = vocabulary()
    assert {"channels", "dim", "num_heads", "device", "dtype"} <= set(table)
    assert table["channels"] is None


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_width_comes_first(spec):
    first = parameters(spec)[0].name
    expected = FIRST.get(spec.layout, ("query_dim", "dim"))
    assert first in ((expected,) if isinstance(expected, str) else expected), (
        f"{spec.cls.__name__} ({spec.layout}) takes {first!r} first; expected {expected!r}"
    )
    assert spec.width == first


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_argument_is_in_the_vocabulary(spec):
    table = vocabulary()
    for param in parameters(spec):
        assert param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD), (
            f"{spec.cls.__name__} takes *{param.name}: unknown arguments must be rejected"
        )
        assert param.name in table, (
            f"{spec.cls.__name__}({param.name}=...) is not in docs/conventions.md's vocabulary table"
        )
        used_by = table[param.name]
        assert used_by is None or spec.name in used_by, (
            f"{param.name!r} is specific to {sorted(used_by or ())} in docs/conventions.md, "
            f"but {spec.name} takes it too"
        )


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_factory_keywords_and_defaults(spec):
    params = {p.name: p for p in parameters(spec)}
    for name in ("device", "dtype"):
        assert name in params and params[name].kind is inspect.Parameter.KEYWORD_ONLY, (
            f"{spec.cls.__name__} lacks the keyword-only factory argument {name}="
        )
    no_default = [n for n, p in list(params.items())[1:] if p.default is inspect.Parameter.empty]
    assert not no_default, f"{spec.cls.__name__} has no default for {no_default}"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_create_from_the_width_alone(spec):
    width = 16
    by_position = attnzoo.create(spec.name, width)
    by_keyword = attnzoo.create(spec.name, **{spec.width: width})
    assert type(by_position) is spec.cls and type(by_keyword) is spec.cls
    alias = "dim" if spec.width == "channels" else "channels"
    if spec.width in ("channels", "dim"):
        assert type(attnzoo.create(spec.name, **{alias: width})) is spec.cls


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_meta_device_allocates_nothing(spec):
    module = spec.cls(**spec.example.kwargs, device="meta")
    tensors = [*module.parameters(), *module.buffers()]
    if not tensors:  # a parameter-free mechanism (dot) accepts device= and allocates nothing by design
        return
    assert all(t.device.type == "meta" for t in tensors)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_dtype_reaches_parameters_and_buffers(spec):
    module = spec.cls(**spec.example.kwargs, dtype=torch.float64)
    floating = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    assert all(t.dtype == torch.float64 for t in floating)
    assert floating or not [*module.parameters(), *module.buffers()], "no floating parameter to check"
    xs = [torch.randn(*s, dtype=torch.float64) for s in spec.example.inputs]
    out = module.eval()(*xs)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_one_way_to_ask_for_the_weights(spec):
    forward = inspect.signature(spec.cls.forward).parameters
    other = {"return_weights", "return_attention", "return_attn", "ret_attn_mask"} & set(forward)
    assert not other, f"{spec.cls.__name__}.forward spells weights as {sorted(other)}; use need_weights"
    assert not hasattr(spec.cls, "capture_attention"), "use attnzoo.capture_maps, not capture_attention"
    if "need_weights" not in forward:
        return
    module = spec.cls(**spec.example.kwargs).eval()
    xs = [torch.randn(*s) for s in spec.example.inputs]
    with torch.no_grad():
        plain = module(*xs)
        out, weights = module(*xs, need_weights=True)
    torch.testing.assert_close(out, plain)
    assert isinstance(weights, torch.Tensor) and torch.isfinite(weights).all()


DROPOUT_OPTIONS = ("attn_drop", "proj_drop", "drop_attn", "dropout", "attention_dropout", "drop_rate")


@pytest.mark.parametrize("spec", attnzoo.list_modules(), ids=lambda s: s.name)
def test_every_dropout_option_is_an_nn_dropout_submodule(spec):
    """As in timm's and fightingcv's modules: code that sets (or zeroes) every nn.Dropout's p in a model
    reaches the attention's dropout too, also after `attnzoo.replace` swapped theirs for ours."""
    import inspect

    from torch import nn

    options = [n for n in DROPOUT_OPTIONS if n in inspect.signature(spec.cls.__init__).parameters]
    for name in options:
        module = spec.cls(**{**spec.example.kwargs, name: 0.25})
        drops = [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0.25]
        assert drops, f"{spec.name}: {name}=0.25 is held by no nn.Dropout module"
