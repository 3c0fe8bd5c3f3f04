"""replace(model, ForeignClass) and attnzoo.convert: torch's attention swapped, weights kept, same output."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.compat import MultiheadAttention
from attnzoo.convert import (
    convert,
    converter_for,
    from_keras,
    from_torch,
    known,
    load_keras_weights,
    register,
)

F64 = dict(atol=1e-10, rtol=1e-10)
E, H = 8, 2


def encoder(batch_first: bool, layers: int = 3, nested: bool = False) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=batch_first, dtype=torch.float64)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=nested)


def src(batch_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 5, E, dtype=torch.float64)
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    return (x if batch_first else x.transpose(0, 1)), pad, causal


@pytest.mark.parametrize("batch_first", [False, True])
def test_replace_torch_mha_keeps_the_output_and_opens_the_maps(batch_first):
    theirs = encoder(batch_first)
    ours = copy.deepcopy(theirs)
    names = attnzoo.replace(ours, nn.MultiheadAttention)
    assert names == [f"layers.{i}.self_attn" for i in range(3)]
    assert all(isinstance(layer.self_attn, MultiheadAttention) for layer in ours.layers)
    x, pad, causal = src(batch_first)
    for kw in ({}, {"mask": causal}, {"src_key_padding_mask": pad}, {"mask": causal, "is_causal": True},
               {"mask": causal.isinf(), "src_key_padding_mask": pad}):
        torch.testing.assert_close(ours(x, **kw), theirs(x, **kw), **F64)
    with attnzoo.capture_maps(ours) as maps:
        out = ours(x, mask=causal, src_key_padding_mask=pad)
    torch.testing.assert_close(out, theirs(x, mask=causal, src_key_padding_mask=pad), **F64)
    assert sorted(maps) == names
    for records in maps.values():
        (record,) = records
        assert record.kind == "rows" and record.data.shape[:2] == (2, H) and record.grid == (5,)
        rows = record.data[0]  # (h, Q, S) of the first sequence: its last two keys are padding
        assert (rows[..., 3:] == 0).all()
        torch.testing.assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)), **F64)


def test_nested_tensor_fast_path_still_equals_torch_and_capture_sees_every_layer():
    theirs = encoder(True, nested=True).eval()
    ours = copy.deepcopy(theirs)
    attnzoo.replace(ours, nn.MultiheadAttention)
    x, pad, _ = src(True)
    with torch.no_grad():
        ref = theirs(x, src_key_padding_mask=pad)  # torch's fused path on nested tensors
        torch.testing.assert_close(ours(x, src_key_padding_mask=pad), ref, **F64)
        with attnzoo.capture_maps(ours) as maps:
            captured = ours(x, src_key_padding_mask=pad)
    assert sorted(maps) == [f"layers.{i}.self_attn" for i in range(3)]
    assert torch.backends.mha.get_fastpath_enabled()  # restored on exit
    # The fast path zeroes padded positions; the unfused path run while capturing leaves them as computed.
    keep = ~pad
    torch.testing.assert_close(captured[keep], ref[keep], **F64)


def test_replace_keeps_shared_modules_shared_and_parameters_in_place():
    shared = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared, nn.Identity())})
    params = list(model.parameters())
    names = attnzoo.replace(model, nn.MultiheadAttention)
    assert names == ["a", "b.0"]
    assert model["a"] is model["b"][0] and isinstance(model["a"], MultiheadAttention)
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))  # an optimizer keeps working


def test_replace_refusals_leave_the_model_untouched():
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = nn.Sequential(nn.MultiheadAttention(E, H), Custom(E, H))
    with pytest.raises(TypeError, match=r"1: from_torch cannot convert .*Custom: it overrides forward"):
        attnzoo.replace(model, nn.MultiheadAttention)
    assert type(model[0]) is nn.MultiheadAttention
    with pytest.raises(TypeError, match="attnzoo.convert knows"):
        attnzoo.replace(model, nn.Linear)
    with pytest.raises(TypeError, match="no constructor arguments"):
        attnzoo.replace(model, nn.MultiheadAttention, reduction=4)
    with pytest.raises(ValueError, match="model itself"):
        attnzoo.replace(nn.MultiheadAttention(E, H), nn.MultiheadAttention)


def test_replace_with_an_attention_argument_still_builds_new_modules():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
    names = attnzoo.replace(model, nn.BatchNorm2d, "se", example_input=torch.randn(1, 3, 8, 8))
    assert names == ["1"] and type(model[1]).__name__ == "SqueezeExcite"


@pytest.mark.parametrize("reason,module", [
    ("not a plain nn.Linear", "lora"),
    ("parameters torch's class does not have", "extra"),
])
def test_from_torch_refuses_what_it_cannot_represent(reason, module):
    mha = nn.MultiheadAttention(E, H)
    if module == "lora":
        mha.out_proj = type("LoRALinear", (nn.Linear,), {"forward": lambda self, x: x})(E, E)
    else:
        mha.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(TypeError, match=reason):
        from_torch(mha)
    with pytest.raises(TypeError, match="expects a torch.nn.MultiheadAttention"):
        from_torch(nn.Linear(2, 2))


def test_from_torch_keeps_mode_dtype_device_and_hooks():
    seen = []
    theirs = nn.MultiheadAttention(E, H, dtype=torch.float64, bias=False).train()
    theirs.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    ours = from_torch(theirs)
    assert ours.training and ours.in_proj_bias is None and ours.out_proj.bias is None
    assert {p.dtype for p in ours.parameters()} == {torch.float64}
    assert {p.device.type for p in ours.parameters()} == {"cpu"}
    x = torch.randn(4, 2, E, dtype=torch.float64)
    ours(x, x, x)
    assert seen == ["MultiheadAttention"]


def test_convert_table_dispatches_and_accepts_new_entries():
    assert "torch.nn.modules.activation.MultiheadAttention" in known()
    assert converter_for(nn.MultiheadAttention) is from_torch
    assert isinstance(convert(nn.MultiheadAttention(E, H)), MultiheadAttention)
    with pytest.raises(TypeError, match="no converter for torch.nn.modules.linear.Linear"):
        convert(nn.Linear(2, 2))

    class Foreign(nn.Identity):
        pass

    register(f"{Foreign.__module__}.{Foreign.__qualname__}", lambda m: nn.Identity())  # a dotted-name key
    model = nn.Sequential(Foreign(), nn.ReLU())
    assert attnzoo.replace(model, Foreign) == ["0"] and type(model[0]) is nn.Identity
    with pytest.raises(TypeError, match="foreign"):
        register(3, from_torch)  # type: ignore[arg-type]


def test_keras_converters_are_still_exported():
    from attnzoo.blocks import convert as blocks_convert

    assert from_keras is blocks_convert.from_keras and load_keras_weights is blocks_convert.load_keras_weights
    assert attnzoo.convert.from_torch is from_torch


def test_a_hooked_self_attn_on_torchs_nested_path_takes_the_nested_tensor_as_torch_does():
    # A forward hook on self_attn stops torch's fused layer, which then hands the nested tensor to it.
    theirs = encoder(True, nested=True).eval()
    ours = copy.deepcopy(theirs)
    attnzoo.replace(ours, nn.MultiheadAttention)
    seen: list[bool] = []
    for model in (theirs, ours):
        for layer in model.layers:
            layer.self_attn.register_forward_hook(lambda m, args, out: seen.append(args[0].is_nested))
    x, pad, _ = src(True)
    with torch.no_grad():
        ref = theirs(x, src_key_padding_mask=pad)
        torch.testing.assert_close(ours(x, src_key_padding_mask=pad), ref, **F64)
    assert seen == [True] * 6  # both classes got the nested tensor, in every layer


def test_a_converter_value_error_names_the_place():
    senet = pytest.importorskip("timm.models.senet", reason="timm missing")
    model = nn.Sequential(nn.Conv2d(3, 5, 1), senet.SEModule(5, 16))  # fc1 is 5 -> 0 channels
    with pytest.raises(ValueError, match=r"^replace: 1: .*rd_channels"):
        attnzoo.replace(model, senet.SEModule)


def test_an_unconvertible_layer_points_at_the_attention_inside_it():
    """torch's Transformer layers keep their class: converting or replacing one says which attention
    class inside it converts, and where, instead of listing every known class."""
    layer = nn.TransformerEncoderLayer(E, H, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    mha = r"torch.nn.modules.activation.MultiheadAttention\)"
    both = "layers.0.self_attn, layers.1.self_attn "
    with pytest.raises(TypeError, match=rf"attnzoo.replace\(model, {mha} swaps {both}"):
        attnzoo.replace(model, nn.TransformerEncoderLayer)
    with pytest.raises(TypeError, match=rf"no converter for .*TransformerEncoder; .*replace\(module, {mha}"):
        convert(model)
    listing = r"attnzoo.convert.known\(\) lists the \d+ classes"
    with pytest.raises(TypeError, match=rf"Linear'> and no attention: {listing}"):
        attnzoo.replace(model, nn.Linear)
    with pytest.raises(TypeError) as err:
        convert(nn.Linear(2, 2))
    assert "MultiheadAttention" not in str(err.value)  # no list of every known class
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention  # nothing changed


def test_replace_takes_the_dotted_name_the_hints_print():
    """The unknown-class hint tells the user to call ``attnzoo.replace(model, <dotted name>)`` and
    `known()` lists dotted names: such a name converts like the class; other strings still refuse."""
    model = encoder(batch_first=True).eval()
    x, pad, _ = src(True)
    before = model(x, src_key_padding_mask=pad)
    name = "torch.nn.modules.activation.MultiheadAttention"
    with pytest.raises(TypeError, match=rf"replace\(model, {name.replace('.', '[.]')}\) swaps"):
        attnzoo.replace(model, nn.TransformerEncoderLayer)
    assert name in known()
    assert attnzoo.replace(model, name) == [f"layers.{i}.self_attn" for i in range(3)]
    assert all(type(layer.self_attn) is MultiheadAttention for layer in model.layers)
    torch.testing.assert_close(model(x, src_key_padding_mask=pad), before, **F64)
    for where in ("layers.0.self_attn", "torch.nn.modules.linear.Linear", "no.such.module.Class"):
        with pytest.raises(TypeError, match=rf"got where='{where}' and no attention"):
            attnzoo.replace(encoder(batch_first=True), where)


def test_a_second_class_replace_changes_nothing_and_returns_no_places():
    """Converting by class is idempotent: once every instance is attnzoo's, a second call finds none and
    returns [] with the model as it was (a pattern that selects nothing is an error instead)."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    first = attnzoo.replace(enc, nn.MultiheadAttention)
    assert first == ["layers.0.self_attn", "layers.1.self_attn"]
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    out = enc(x)
    assert attnzoo.replace(enc, nn.MultiheadAttention) == []
    torch.testing.assert_close(enc(x), out, rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in enc.state_dict().items())
    with pytest.raises(ValueError):
        attnzoo.replace(enc, "no_such_place*", "se")
