"""compat.MultiheadAttention against torch's nn.MultiheadAttention: state_dicts, masks, layouts, layers."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.compat import MultiheadAttention
from attnzoo.convert import from_torch

F64 = dict(atol=1e-10, rtol=1e-10)
F32 = dict(atol=1e-5, rtol=1e-4)
E, H, B, L, S = 8, 2, 3, 4, 6


def pair(dtype: torch.dtype = torch.float64, **kw) -> tuple[nn.MultiheadAttention, MultiheadAttention]:
    """torch's module with random weights (biases too) and ours loaded from its state_dict."""
    theirs = nn.MultiheadAttention(E, H, dtype=dtype, **kw)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.5)
    ours = MultiheadAttention(E, H, dtype=dtype, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def inputs(batch_first: bool, kdim: int = E, vdim: int = E, dtype=torch.float64):
    q = torch.randn(B, L, E, dtype=dtype)
    k = torch.randn(B, S, kdim, dtype=dtype)
    v = torch.randn(B, S, vdim, dtype=dtype)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (B, N, E) -> (N, B, E)
    return q, k, v


def masks(dtype=torch.float64) -> dict[str, dict]:
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -2:] = True
    pad[2, 0] = True
    blocked = torch.rand(L, S) > 0.7
    blocked[:, 0] = False  # no row fully masked here (torch would give NaN)
    return {
        "none": {},
        "bool_2d": {"attn_mask": blocked},
        "float_2d": {"attn_mask": torch.randn(L, S, dtype=dtype)},
        "bool_3d": {"attn_mask": (torch.rand(B * H, L, S) > 0.7) & ~torch.eye(L, S, dtype=torch.bool)},
        "float_3d": {"attn_mask": torch.randn(B * H, L, S, dtype=dtype)},
        "kpm_bool": {"key_padding_mask": pad},
        "kpm_float": {"key_padding_mask": torch.randn(B, S, dtype=dtype)},
        "both_bool": {"attn_mask": blocked, "key_padding_mask": pad},
        "both_float": {"attn_mask": torch.randn(L, S, dtype=dtype),
                       "key_padding_mask": torch.randn(B, S, dtype=dtype)},
        "causal": {"attn_mask": torch.ones(L, S, dtype=torch.bool).triu(1), "is_causal": True},
        "causal_kpm": {"attn_mask": torch.ones(L, S, dtype=torch.bool).triu(1), "is_causal": True,
                       "key_padding_mask": ~torch.ones(B, S, dtype=torch.bool).tril()[:, :S]},
    }


def assert_same(theirs, ours, args, tol=F64, **kw) -> None:
    ref_out, ref_w = theirs(*args, **kw)
    out, w = ours(*args, **kw)
    torch.testing.assert_close(out, ref_out, **tol)
    if ref_w is None:
        assert w is None
    else:
        torch.testing.assert_close(w, ref_w, **tol)


# -- state_dict and construction ---------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {}, {"bias": False}, {"add_bias_kv": True}, {"kdim": 3, "vdim": 5}, {"kdim": 3, "add_bias_kv": True},
])
def test_state_dict_round_trips_strict_both_ways(kw):
    theirs, ours = pair(**kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape
    fresh = nn.MultiheadAttention(E, H, dtype=torch.float64, **kw)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, theirs.state_dict()[key], atol=0, rtol=0)


def test_attributes_match_torch():
    theirs, ours = pair(kdim=3, vdim=5, batch_first=True, dropout=0.25)
    for name in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout", "batch_first",
                 "_qkv_same_embed_dim", "add_zero_attn"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.in_proj_weight is None and theirs.in_proj_weight is None
    assert isinstance(ours.out_proj, nn.Linear)


def test_device_and_dtype_reach_every_parameter():
    meta = MultiheadAttention(E, H, add_bias_kv=True, kdim=3, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    f64 = MultiheadAttention(E, H, add_bias_kv=True, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in f64.parameters())


def test_initialisation_follows_torch():
    torch.manual_seed(3)
    theirs = nn.MultiheadAttention(E, H, add_bias_kv=True)
    torch.manual_seed(3)
    ours = MultiheadAttention(E, H, add_bias_kv=True)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=0, rtol=0)


# -- forward against torch ---------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask", list(masks()))
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_masks_equal_torch_in_train_and_eval(batch_first, mask, need_weights, average):
    theirs, ours = pair(batch_first=batch_first)
    args = inputs(batch_first)
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        assert_same(theirs, ours, args, need_weights=need_weights, average_attn_weights=average,
                    **masks()[mask])


@pytest.mark.parametrize("kw", [
    {"kdim": 3, "vdim": 5}, {"add_bias_kv": True}, {"add_zero_attn": True},
    {"add_bias_kv": True, "add_zero_attn": True, "kdim": 3, "vdim": 5}, {"bias": False},
])
@pytest.mark.parametrize("mask", ["none", "bool_2d", "float_3d", "both_bool", "causal"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_options_equal_torch(kw, mask, need_weights):
    for batch_first in (False, True):
        theirs, ours = pair(batch_first=batch_first, **kw)
        args = inputs(batch_first, kw.get("kdim", E), kw.get("vdim", E))
        assert_same(theirs, ours, args, need_weights=need_weights, average_attn_weights=False,
                    **masks()[mask])


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_and_shared_key_value(batch_first):
    theirs, ours = pair(batch_first=batch_first)
    q, k, _ = inputs(batch_first)
    with torch.no_grad():  # eval + no grad: torch's own fused fast path, which ours must match
        theirs.eval()
        ours.eval()
        assert_same(theirs, ours, (q, q, q), key_padding_mask=masks()["kpm_bool"]["key_padding_mask"][:, :L])
    assert_same(theirs, ours, (q, k, k), need_weights=False)


@pytest.mark.parametrize("mask", [{}, {"key_padding_mask": torch.tensor([0, 0, 1, 0, 1, 0]).bool()},
                                  {"attn_mask": torch.randn(H, L, S, dtype=torch.float64)}])
@pytest.mark.parametrize("average", [True, False])
def test_unbatched_equals_torch(mask, average):
    theirs, ours = pair(batch_first=True)  # batch_first is ignored for unbatched input, as in torch
    q, k, v = (t[0] for t in inputs(True))
    assert_same(theirs, ours, (q, k, v), average_attn_weights=average, **mask)
    out, w = ours(q, k, v, average_attn_weights=average, **mask)
    assert out.shape == (L, E) and w.shape == ((L, S) if average else (H, L, S))


def test_float32_equals_torch():
    theirs, ours = pair(dtype=torch.float32, batch_first=True)
    args = inputs(True, dtype=torch.float32)
    for mask in ("none", "both_bool", "float_3d"):
        assert_same(theirs, ours, args, tol=F32, **masks(torch.float32)[mask])


def test_gradients_equal_torch():
    theirs, ours = pair(add_bias_kv=True)
    args = inputs(False)
    m = masks()["both_float"]
    theirs(*args, **m)[0].square().sum().backward()
    ours(*args, **m)[0].square().sum().backward()
    grads = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, **F64)


@pytest.mark.parametrize("fused", [True, False])
def test_fully_masked_rows_give_zeros_and_finite_grads(fused):
    theirs, ours = pair(batch_first=True)
    q, k, v = (t.requires_grad_() for t in inputs(True))
    blocked = torch.zeros(L, S, dtype=torch.bool)
    blocked[1] = True  # query 1 may attend nothing
    ref, _ = theirs(q, k, v, attn_mask=blocked)
    assert torch.isnan(ref[:, 1]).all()  # torch: NaN
    with attnzoo.fused_attn(fused):
        out, w = ours(q, k, v, attn_mask=blocked)
        padded, _ = ours(q, k, v, key_padding_mask=torch.ones(B, S, dtype=torch.bool))  # every key padding
        additive, _ = ours(q, k, v, attn_mask=torch.where(blocked, float("-inf"), 0.0).double())
    bias = ours.out_proj.bias.detach()
    torch.testing.assert_close(padded, bias.expand(B, L, E), **F64)
    torch.testing.assert_close(additive, out, **F64)
    torch.testing.assert_close(out[:, 1], bias.expand(B, E), **F64)  # zero attention, then out_proj
    assert (w[:, 1] == 0).all()
    keep = [0, 2, 3]
    torch.testing.assert_close(out[:, keep], ref[:, keep], **F64)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_dropout_in_training_changes_output_and_eval_does_not():
    _, ours = pair(dropout=0.5, batch_first=True)
    args = inputs(True)
    ours.eval()
    first, second = ours(*args)[0], ours(*args)[0]
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    ours.train()
    assert not torch.allclose(ours(*args, need_weights=False)[0], first)


# -- input checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("call,error,words", [
    (lambda m, q, k, v: m(q[..., :5], k, v), ValueError, "embed_dim=8"),
    (lambda m, q, k, v: m(q, k[..., :5], v), ValueError, "kdim=8"),
    (lambda m, q, k, v: m(q, k, v[:, :, None]), ValueError, "value"),
    (lambda m, q, k, v: m(q, k, v[:-1]), ValueError, "one length S"),
    (lambda m, q, k, v: m(q, k, v, attn_mask=torch.zeros(L, S + 1, dtype=torch.bool)), ValueError,
     "attn_mask"),
    (lambda m, q, k, v: m(q, k, v, attn_mask=torch.zeros(L, S, dtype=torch.long)), TypeError, "attn_mask"),
    (lambda m, q, k, v: m(q, k, v, key_padding_mask=torch.zeros(S, B, dtype=torch.bool)), ValueError,
     "key_padding_mask"),
    (lambda m, q, k, v: m(q, k, v, key_padding_mask=torch.zeros(B, S, dtype=torch.int32)), TypeError,
     "key_padding_mask"),
    (lambda m, q, k, v: m(q.float(), k.float(), v.float()), TypeError, "dtype"),
    (lambda m, q, k, v: m(q, k.float(), v), TypeError, r"key of dtype torch.float64 .*got torch.float32"),
    (lambda m, q, k, v: m(q, k, v, is_causal=True), ValueError, "is_causal"),
    (lambda m, q, k, v: m(q[0, 0], k[0, 0], v[0, 0]), ValueError, "query"),
])
def test_bad_input_names_the_argument(call, error, words):
    _, ours = pair()
    with pytest.raises(error, match=words):
        call(ours, *inputs(False))


@pytest.mark.parametrize("kw,words", [
    ({"embed_dim": 10, "num_heads": 3}, "divisible"),
    ({"embed_dim": 0, "num_heads": 1}, "embed_dim"),
    ({"embed_dim": 8, "num_heads": 2, "dropout": 1.5}, "dropout"),
    ({"embed_dim": 8, "num_heads": 2, "kdim": 0}, "kdim"),
])
def test_bad_constructor_arguments(kw, words):
    with pytest.raises(ValueError, match=words):
        MultiheadAttention(**kw)


# -- maps --------------------------------------------------------------------------------------


def test_capture_maps_records_without_need_weights():
    theirs, ours = pair(batch_first=True)
    q, k, v = inputs(True)
    blocked = masks()["bool_2d"]["attn_mask"]
    with attnzoo.capture_maps(ours) as maps:
        ours(q, k, v, attn_mask=blocked, need_weights=False)
    (record,) = maps["MultiheadAttention"]
    _, per_head = theirs(q, k, v, attn_mask=blocked, average_attn_weights=False)  # (B, h, L, S)
    assert record.kind == "rows" and record.grid == (S,)
    torch.testing.assert_close(record.data, per_head[:, :, record.queries], **F64)


# -- inside torch's transformer layers ---------------------------------------------------------


def swapped(model: nn.Module) -> nn.Module:
    """A deep copy with every nn.MultiheadAttention converted."""
    model = copy.deepcopy(model)
    attnzoo.replace(model, nn.MultiheadAttention)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    return model


def layer_inputs(batch_first: bool, length: int):
    x = torch.randn(B, length, E, dtype=torch.float64)
    pad = torch.zeros(B, length, dtype=torch.bool)
    pad[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
    return (x if batch_first else x.transpose(0, 1)), pad, causal


@pytest.mark.parametrize("batch_first,norm_first", list(itertools.product([False, True], [False, True])))
def test_encoder_equals_torch(batch_first, norm_first):
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first,
                                       dtype=torch.float64)
    theirs = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    ours = swapped(theirs)
    x, pad, causal = layer_inputs(batch_first, L)
    calls = [{}, {"mask": causal}, {"src_key_padding_mask": pad}, {"mask": causal, "is_causal": True},
             {"mask": causal, "src_key_padding_mask": pad.to(torch.float64).masked_fill(pad, -torch.inf)}]
    for kw in calls:
        torch.testing.assert_close(ours(x, **kw), theirs(x, **kw), **F64)
    theirs.eval()
    ours.eval()
    with torch.no_grad():  # torch's fused encoder-layer path reads our parameters and merge_masks
        for kw in calls:
            torch.testing.assert_close(ours(x, **kw), theirs(x, **kw), **F64)


@pytest.mark.parametrize("batch_first,norm_first", list(itertools.product([False, True], [False, True])))
def test_decoder_layer_equals_torch(batch_first, norm_first):
    theirs = nn.TransformerDecoderLayer(E, H, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first,
                                        dtype=torch.float64)
    ours = swapped(theirs)
    tgt, tgt_pad, causal = layer_inputs(batch_first, L)
    memory, memory_pad, _ = layer_inputs(batch_first, S)
    memory_mask = torch.randn(L, S, dtype=torch.float64)
    calls = [{}, {"tgt_mask": causal, "tgt_is_causal": True},
             {"tgt_mask": causal, "tgt_key_padding_mask": tgt_pad, "memory_key_padding_mask": memory_pad},
             {"memory_mask": memory_mask, "tgt_mask": causal}]
    for kw in calls:
        torch.testing.assert_close(ours(tgt, memory, **kw), theirs(tgt, memory, **kw), **F64)


@pytest.mark.parametrize("batch_first", [False, True])
def test_whole_transformer_equals_torch_and_opens_its_maps(batch_first):
    theirs = nn.Transformer(E, H, 2, 2, 16, dropout=0.0, batch_first=batch_first, dtype=torch.float64)
    ours = swapped(theirs)
    src, src_pad, _ = layer_inputs(batch_first, S)
    tgt, tgt_pad, causal = layer_inputs(batch_first, L)
    kw = {"tgt_mask": causal, "src_key_padding_mask": src_pad, "memory_key_padding_mask": src_pad,
          "tgt_key_padding_mask": tgt_pad, "tgt_is_causal": True}
    torch.testing.assert_close(ours(src, tgt, **kw), theirs(src, tgt, **kw), **F64)
    with attnzoo.capture_maps(ours) as maps:
        ours(src, tgt, **kw)
    names = {f"encoder.layers.{i}.self_attn" for i in range(2)}
    names |= {f"decoder.layers.{i}.{a}" for i in range(2) for a in ("self_attn", "multihead_attn")}
    assert set(maps) == names


@pytest.mark.parametrize("batch_first", [False, True])
def test_layers_with_dropout_draw_torchs_masks_in_training(batch_first):
    """The output is laid out as torch's (token-major), so the layers' own dropout after the attention
    drops the same elements under one seed; the attention's dropout draws torch's mask as well."""
    torch.manual_seed(0)
    theirs = nn.Transformer(E, H, 1, 1, 16, dropout=0.1, batch_first=batch_first, dtype=torch.float64).train()
    ours = swapped(theirs)
    src, _, _ = layer_inputs(batch_first, S)
    tgt, _, causal = layer_inputs(batch_first, L)
    torch.manual_seed(1)
    expected = theirs(src, tgt, tgt_mask=causal)
    torch.manual_seed(1)
    torch.testing.assert_close(ours(src, tgt, tgt_mask=causal), expected, **F64)
    mha = theirs.encoder.layers[0].self_attn
    out_theirs = mha(src, src, src)[0]
    assert ours.encoder.layers[0].self_attn(src, src, src)[0].stride() == out_theirs.stride()
    unbatched = src[0] if batch_first else src[:, 0]
    assert ours.encoder.layers[0].self_attn(unbatched, unbatched, unbatched)[0].is_contiguous()


def test_from_torch_shares_parameters_and_training_flag():
    theirs = nn.MultiheadAttention(E, H, kdim=3, add_bias_kv=True, batch_first=True).eval()
    ours = from_torch(theirs)
    assert not ours.training
    assert dict(ours.named_parameters()).keys() == dict(theirs.named_parameters()).keys()
    for (_, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert a is b
    q, k, v = inputs(True, kdim=3, dtype=torch.float32)
    assert_same(theirs, ours, (q, k, v), tol=F32, key_padding_mask=masks()["kpm_bool"]["key_padding_mask"])


@pytest.mark.parametrize("flag", [0, 1])
def test_integer_need_weights_acts_as_in_torch(flag):
    """torch takes any truthy value for need_weights; so does the compat class (attend itself, and the
    canonical classes, take bools only)."""
    theirs, ours = pair(batch_first=True)
    theirs.eval(), ours.eval()
    q, k, v = inputs(True, dtype=torch.float64)
    want, got = theirs(q, k, v, need_weights=flag), ours(q, k, v, need_weights=flag)
    assert (got[1] is None) == (want[1] is None)
    torch.testing.assert_close(got[0], want[0], **F64)
    if flag:
        torch.testing.assert_close(got[1], want[1], **F64)


def _nested(dtype=torch.float64) -> torch.Tensor:
    return torch.nested.nested_tensor([torch.randn(n, E, dtype=dtype) for n in (5, 3, 1)])


@pytest.mark.parametrize(("need_weights", "average"), [(False, True), (True, True), (True, False)])
def test_a_nested_self_attention_query_equals_torchs_fast_path(need_weights, average):
    theirs, ours = pair(batch_first=True)
    theirs.eval(), ours.eval()
    x = _nested()
    with torch.no_grad():
        out_t, w_t = theirs(x, x, x, need_weights=need_weights, average_attn_weights=average)
        out_o, w_o = ours(x, x, x, need_weights=need_weights, average_attn_weights=average)
    assert out_o.is_nested
    for a, b in zip(out_o.unbind(), out_t.unbind(), strict=True):
        torch.testing.assert_close(a, b, **F64)
    if need_weights:  # padded (B, [h,] L, L), a padding query's row zero
        torch.testing.assert_close(w_o, w_t, **F64)
    else:
        assert w_o is None and w_t is None


def test_a_nested_query_trains_where_torch_refuses_and_gives_the_padded_gradient():
    _, ours = pair(batch_first=True)
    rows = [torch.randn(n, E, dtype=torch.float64) for n in (4, 2)]
    x = torch.nested.as_nested_tensor(rows).requires_grad_()
    out, _ = ours(x, x, x, need_weights=False)
    out.to_padded_tensor(0.0).sum().backward()
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).requires_grad_()
    pad = torch.tensor([[False] * 4, [False, False, True, True]])
    ref, _ = ours(padded, padded, padded, key_padding_mask=pad, need_weights=False)
    ref.masked_fill(pad[..., None], 0.0).sum().backward()
    for grad, want, n in zip(x.grad.unbind(), padded.grad, (4, 2), strict=True):
        torch.testing.assert_close(grad, want[:n], **F64)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, x: m(x, x.clone(), x.clone()), "self-attention only"),
        (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool)), "no attn_mask"),
        (lambda m, x: m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.bool)), "no attn_mask"),
        (lambda m, x: m(torch.randn(3, 5, E, dtype=torch.float64), x, x), "as query only"),
    ],
)
def test_nested_inputs_torch_cannot_take_are_refused_by_name(call, message):
    _, ours = pair(batch_first=True)
    with pytest.raises(TypeError, match=message):
        call(ours.eval(), _nested())


def test_a_nested_query_needs_batch_first_as_in_torch():
    _, ours = pair(batch_first=False)
    x = _nested()
    with pytest.raises(TypeError, match="batch_first=True"):
        ours(x, x, x)


def test_nested_queries_refuse_is_causal_without_a_mask_and_empty_batches():
    _, ours = pair(batch_first=True)
    x = _nested()
    with pytest.raises(ValueError, match="expects attn_mask with is_causal=True"):
        ours(x, x, x, is_causal=True)
    empty = torch.nested.nested_tensor([torch.zeros(0, E, dtype=torch.float64)] * 2)
    with pytest.raises(ValueError, match="at least one token, got 2 empty"):
        ours(empty, empty, empty)
