"""Seed 001's prefix-named blocks in PyTorch: names, values against a float64 reference, errors."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import attnzoo
from attnzoo.blocks.keras_attention import KerasMultiHeadAttention
from attnzoo.blocks.transformer import (
    CrossAttentionBlock,
    FeedForwardBlock,
    SelfAttentionBlock,
    cross_attention,
    feed_forward,
    keras_block_kwargs,
    self_attention,
)

ROOT = Path(__file__).resolve().parents[2]


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module


# ---------------------------------------------------------------------------------------------
# A plain float64 reference, written from Keras's documented computation


def ref_mha(mha: KerasMultiHeadAttention, x, ctx, keep=None):
    sd = {k: v.double() for k, v in mha.state_dict().items()}
    bias = (lambda n: sd[n]) if mha.query.bias is not None else (lambda n: 0.0)
    q = torch.einsum("bld,dhk->blhk", x, sd["query.kernel"]) + bias("query.bias")
    k = torch.einsum("bse,ehk->bshk", ctx, sd["key.kernel"]) + bias("key.bias")
    v = torch.einsum("bse,ehv->bshv", ctx, sd["value.kernel"]) + bias("value.bias")
    scores = torch.einsum("blhk,bshk->bhls", q / math.sqrt(mha.key_dim), k)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # fully masked row -> zeros
    heads = torch.einsum("bhls,bshv->blhv", weights, v)
    out = torch.einsum("blhv,hv...->bl...", heads, sd["attention_output.kernel"])
    return out + bias("attention_output.bias")


def ref_norm(y, norm):
    mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    return (y - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def causal_keep(length_q, length_k):
    return torch.ones(length_q, length_k, dtype=torch.bool).tril()


# ---------------------------------------------------------------------------------------------
# Names: what `prefix` does


def test_prefix_names_every_sub_module_and_state_dict_key():
    block = self_attention((5, 8), prefix="enc0", num_heads=2, key_dim=4)
    assert [n for n, _ in block.named_children()] == ["enc0_attn1", "enc0_add1", "enc0_norm1"]
    assert block.layer_names == ("enc0_in1", "enc0_attn1", "enc0_add1", "enc0_norm1")
    assert block.model_name == "enc0_att"
    assert sorted(block.state_dict()) == sorted(
        f"enc0_attn1.{p}.{w}"
        for p in ("query", "key", "value", "attention_output")
        for w in ("kernel", "bias")
    ) + ["enc0_norm1.bias", "enc0_norm1.weight"]
    cross = cross_attention((5, 8), (7, 6), prefix="dec1", num_heads=2, key_dim=4)
    assert [n for n, _ in cross.named_children()] == ["dec1_attn2", "dec1_add2", "dec1_norm2"]
    assert cross.layer_names == ("dec1_ctx2", "dec1_in2", "dec1_attn2", "dec1_add2", "dec1_norm2")
    assert cross.model_name == "dec1_cross"
    ff = feed_forward((5, 8), 8, 16, prefix="dec1")
    assert [n for n, _ in ff.named_children()] == [
        "dec1_ff1",
        "dec1_ff2",
        "dec1_drop",
        "dec1_add3",
        "dec1_norm3",
    ]
    assert ff.layer_names == ("dec1_in3", "dec1_ff1", "dec1_ff2", "dec1_drop", "dec1_add3", "dec1_norm3")
    assert ff.model_name == "dec1_ff"


def test_prefixes_keep_names_unique_in_a_stack():
    stack = torch.nn.Sequential(
        self_attention((None, 8), prefix="enc0", num_heads=2, key_dim=4),
        feed_forward((None, 8), 8, 16, prefix="enc0"),
        self_attention((None, 8), prefix="enc1", num_heads=2, key_dim=4),
        feed_forward((None, 8), 8, 16, prefix="enc1"),
    )
    leaves = [n.rsplit(".", 1)[-1] for n, _ in stack.named_modules() if n.count(".") == 1]
    assert len(leaves) == len(set(leaves)) == 2 * (3 + 5)
    assert stack(torch.randn(2, 3, 8)).shape == (2, 3, 8)


def test_defaults_follow_keras():
    block = self_attention((5, 8), num_heads=2, key_dim=4)
    assert block.prefix == "att" and block.model_name == "att_att"
    assert block.att_norm1.eps == 1e-3
    assert block.attention.value_dim == 4 and block.attention.output_shape == (8,)
    assert tuple(block.attention.query.kernel.shape) == (8, 2, 4)
    assert tuple(block.attention.attention_output.kernel.shape) == (2, 4, 8)
    assert torch.equal(block.attention.query.bias, torch.zeros(2, 4))
    limit = math.sqrt(6 / (2 * 8 + 4 * 8))  # Keras glorot_uniform fans for a (8, 2, 4) kernel
    assert block.attention.query.kernel.abs().max() <= limit
    ff = feed_forward((5, 8), 8, 16)
    assert ff.prefix == "ff" and ff.model_name == "ff_ff" and ff.ff_drop.p == 0.1


def test_create_by_seed_name_runs_the_builder():
    block = attnzoo.create("self_attention", input_shape=(5, 8), num_heads=2, key_dim=4, mask=True)
    assert type(block) is SelfAttentionBlock and block.causal and block.seq_len == 5
    cross = attnzoo.create(
        "cross_attention", input_shape=(5, 8), context_shape=(3, 6), num_heads=1, key_dim=2
    )
    assert type(cross) is CrossAttentionBlock and cross.attention.context_dim == 6
    from attnzoo import compat

    assert compat.self_attention is self_attention and compat.feed_forward is feed_forward


# ---------------------------------------------------------------------------------------------
# Values against the float64 reference


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("use_bias", [True, False])
def test_self_attention_matches_reference(causal, use_bias):
    block = (
        randomize(self_attention((6, 8), mask=causal, num_heads=3, key_dim=2, value_dim=5, use_bias=use_bias))
        .double()
        .eval()
    )
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    keep = causal_keep(6, 6) if causal else None
    expected = ref_norm(x + ref_mha(block.attention, x, x, keep), block.att_norm1)
    torch.testing.assert_close(block(x), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_padding_and_attention_masks_match_reference(causal, fused):
    block = randomize(self_attention((6, 8), mask=causal, num_heads=2, key_dim=4)).double().eval()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    extra = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    extra[:, :, 0] = True  # every query keeps at least key 0
    keep = pad[:, None, None, :] & extra[:, None]
    if causal:
        keep = keep & causal_keep(6, 6)
    expected = ref_norm(x + ref_mha(block.attention, x, x, keep), block.att_norm1)
    with attnzoo.fused_attn(fused):
        out = block(x, attention_mask=extra, padding_mask=pad)
        out_int = block(x, attention_mask=extra.long(), padding_mask=pad.int())  # Keras casts 0/1 masks
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out_int, expected, atol=1e-10, rtol=1e-10)


def test_fully_masked_query_gets_zero_attention_output():
    mha = randomize(KerasMultiHeadAttention(8, 2, 4, use_bias=False)).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    keep = torch.tensor([[True, True, True], [False, False, False], [True, False, False]])
    for fused in (True, False):
        with attnzoo.fused_attn(fused):
            out = mha(x, attention_mask=keep)
        assert torch.isfinite(out).all() and torch.equal(out[0, 1], torch.zeros(8, dtype=torch.float64))
        torch.testing.assert_close(out, ref_mha(mha, x, x, keep[None, None]), atol=1e-10, rtol=1e-10)


def test_cross_attention_matches_reference_with_context_mask():
    block = randomize(cross_attention((5, 8), (7, 6), num_heads=2, key_dim=3, value_dim=4)).double().eval()
    x, ctx = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
    ctx_keep = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = ref_norm(ref_mha(block.attention, x, ctx, ctx_keep[:, None, None]) + x, block.att_norm2)
    torch.testing.assert_close(block(x, ctx, context_mask=ctx_keep), expected, atol=1e-10, rtol=1e-10)


def test_feed_forward_matches_reference_and_drops_only_in_training():
    block = randomize(feed_forward((5, 8), 8, 16, dropout=0.5)).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    sd = {k: v.double() for k, v in block.state_dict().items()}
    hidden = torch.relu(x @ sd["ff_ff1.weight"].T + sd["ff_ff1.bias"])
    expected = ref_norm(x + hidden @ sd["ff_ff2.weight"].T + sd["ff_ff2.bias"], block.ff_norm3)
    torch.testing.assert_close(block.eval()(x), expected, atol=1e-10, rtol=1e-10)
    block.train()
    assert not torch.allclose(block(x), expected)


def test_attention_dropout_acts_on_weights_in_training_only():
    block = randomize(self_attention((6, 8), num_heads=2, key_dim=4, dropout=0.5))
    plain = randomize(self_attention((6, 8), num_heads=2, key_dim=4)).eval()
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(block.eval()(x), plain(x))
    block.train()
    assert not torch.allclose(block(x), plain(x))


def test_output_shape_tuple_in_the_attention_layer():
    mha = randomize(
        KerasMultiHeadAttention(8, 2, 4, value_dim=3, output_shape=(2, 5), context_dim=6)
    ).double()
    x, ctx = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
    out = mha(x, ctx)
    assert out.shape == (2, 4, 2, 5)
    torch.testing.assert_close(out, ref_mha(mha, x, ctx), atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Bad input and bad arguments


def test_wrong_feature_size_and_length_name_expected_and_given():
    block = self_attention((5, 8), num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 5, 8\) with D=8, got \(2, 5, 9\)"):
        block(torch.randn(2, 5, 9))
    with pytest.raises(ValueError, match=r"with L=5, got \(2, 6, 8\)"):
        block(torch.randn(2, 6, 8))
    cross = cross_attention((None, 8), (None, 6), num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match=r"context of shape \(2, S, 6\) with E=6, got \(2, 3, 5\)"):
        cross(torch.randn(2, 4, 8), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"with B=2, got \(3, 3, 6\)"):
        cross(torch.randn(2, 4, 8), torch.randn(3, 3, 6))
    with pytest.raises(TypeError, match="dtype"):
        cross(torch.randn(2, 4, 8), torch.randn(2, 3, 6, dtype=torch.float64))


def test_masks_that_do_not_broadcast_are_rejected():
    block = self_attention((None, 8), num_heads=2, key_dim=4)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"attention_mask broadcastable to \(2, 5, 5\), got \(2, 5, 4\)"):
        block(x, attention_mask=torch.ones(2, 5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"padding_mask broadcastable to \(2, 5\), got \(3, 5\)"):
        block(x, padding_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool dtype"):
        block(x, attention_mask=torch.zeros(5, 5))
    cross = cross_attention((None, 8), (None, 6), num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match=r"context_mask broadcastable to \(2, 3\), got \(2, 4\)"):
        cross(x, torch.randn(2, 3, 6), context_mask=torch.ones(2, 4, dtype=torch.bool))


def test_masks_of_any_broadcastable_rank_run():
    """A 0-D (or 1-D) mask broadcasts like any other; a 0-D padding mask hit an IndexError."""
    block = self_attention((None, 8), num_heads=2, key_dim=4)
    x = torch.randn(2, 5, 8)
    ref = block(x)
    for name in ("attention_mask", "padding_mask"):
        for mask in (torch.tensor(True), torch.ones(5, dtype=torch.bool)):
            torch.testing.assert_close(block(x, **{name: mask}), ref)
    cross = cross_attention((None, 8), (None, 6), num_heads=2, key_dim=4)
    context = torch.randn(2, 3, 6)
    torch.testing.assert_close(cross(x, context, context_mask=torch.tensor(1)), cross(x, context))


@pytest.mark.parametrize("prefix", ["", "a.b", "1st", "enc-0", "att ", "é"])
def test_prefix_must_be_an_identifier_fragment(prefix):
    for build in (
        lambda: self_attention((5, 8), prefix=prefix, num_heads=2, key_dim=4),
        lambda: cross_attention((5, 8), (5, 8), prefix=prefix, num_heads=2, key_dim=4),
        lambda: feed_forward((5, 8), 8, 16, prefix=prefix),
    ):
        with pytest.raises(ValueError, match=f"prefix must be an identifier fragment.*got {prefix!r}"):
            build()
    with pytest.raises(TypeError, match="prefix must be a str"):
        self_attention((5, 8), prefix=3, num_heads=2, key_dim=4)


def test_bad_builder_and_constructor_arguments():
    with pytest.raises(ValueError, match=r"input_shape = \(L, D\).*got \(8,\)"):
        self_attention((8,), num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match=r"context_shape = \(L, D\).*got \(3, 0\)"):
        cross_attention((5, 8), (3, 0), num_heads=2, key_dim=4)
    with pytest.raises(TypeError, match="requires \\['key_dim'\\]"):
        self_attention((5, 8), num_heads=2)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['kernel_initializer'\\]"):
        self_attention((5, 8), num_heads=2, key_dim=4, kernel_initializer="zeros")
    with pytest.raises(TypeError, match="mask must be a bool"):
        self_attention((5, 8), mask=1, num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match=r"output_shape = \(8,\).*got \(6,\)"):
        self_attention((5, 8), num_heads=2, key_dim=4, output_shape=6)
    with pytest.raises(ValueError, match="model_dim = input_shape\\[-1\\] = 8.*got 6"):
        feed_forward((5, 8), 6, 16)
    with pytest.raises(ValueError, match="num_heads must be >= 1, got 0"):
        SelfAttentionBlock(8, 0, 4)
    with pytest.raises(ValueError, match="dropout must be <= 1"):
        FeedForwardBlock(8, 16, dropout=1.5)


# ---------------------------------------------------------------------------------------------
# The Keras side is optional


def test_missing_keras_gives_a_clear_import_error(monkeypatch):
    from attnzoo.blocks import keras as akeras

    monkeypatch.setitem(sys.modules, "keras", None)  # import keras -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'attnzoo\[keras\]'"):
        akeras.self_attention((5, 8), num_heads=2, key_dim=4)


@pytest.mark.parametrize(("config", "chosen"), [
    (None, "torch"), ('{"backend": "tensorflow"}', "torch"), ("not json", "torch"),
    ('{"backend": "numpy"}', None),  # an installed backend named in keras.json is Keras's to pick
])
def test_keras_gets_the_torch_backend_when_keras_json_names_a_missing_one(
    monkeypatch, tmp_path, config, chosen
):
    """Keras's first import writes a keras.json naming "tensorflow" whatever backend it ran on; without
    TensorFlow that file must not stop attnzoo from choosing torch on the next import."""
    from attnzoo.blocks import keras as akeras

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: a keras.json naming it is a usable choice")
    home, stub = tmp_path / "home", tmp_path / "stub"
    home.mkdir(), (stub / "keras").mkdir(parents=True)
    if config is not None:
        (home / "keras.json").write_text(config)
    (stub / "keras" / "__init__.py").write_text('__version__ = "3.0.0"\n')  # stands in for Keras 3
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.setenv("KERAS_BACKEND", "x")
    monkeypatch.delenv("KERAS_BACKEND")  # restored (or removed) after the test
    monkeypatch.setitem(sys.modules, "keras", None)
    monkeypatch.delitem(sys.modules, "keras")  # so the stub is imported, and the real module restored after
    monkeypatch.syspath_prepend(str(stub))
    assert akeras.import_keras().__version__ == "3.0.0"
    assert akeras.os.environ.get("KERAS_BACKEND") == chosen


@pytest.mark.parametrize("missing_keras", [False, True])
def test_keras_converters_refuse_what_is_not_a_keras_model(monkeypatch, missing_keras):
    from attnzoo.blocks.convert import from_keras, keras_layer_weights, load_keras_weights

    if missing_keras:
        monkeypatch.setitem(sys.modules, "keras", None)  # find_spec("keras") -> None
    hint = r" \(Keras is not installed: pip install 'attnzoo\[keras\]'\)" if missing_keras else ""
    block = SelfAttentionBlock(8, 2, 4)  # a torch module where the Keras model belongs
    for call, name in ((lambda: from_keras(block), "from_keras"),
                       (lambda: keras_layer_weights(block), "keras_layer_weights"),
                       (lambda: load_keras_weights(block, object()), "load_keras_weights")):
        with pytest.raises(TypeError, match=rf"^{name} expects a Keras model .*got .*{hint}$"):
            call()


def test_toy_transformer_example_builds_its_task_and_learns():
    spec = importlib.util.spec_from_file_location("transformer_toy", ROOT / "examples" / "transformer_toy.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    gen = torch.Generator().manual_seed(0)
    src, dec_in, reply = toy.make_batch(4, gen)
    lengths = (src != toy.PAD).sum(1)
    for i, n in enumerate(lengths.tolist()):  # the task: the reply is the message reversed, then END
        assert reply[i, :n].tolist() == src[i, :n].flip(0).tolist() and reply[i, n] == toy.END
    assert torch.equal(dec_in[:, 1:], reply[:, :-1]) and (dec_in[:, 0] == toy.START).all()
    model = toy.ToyTransformer(dim=16, num_heads=2, ff_dim=32, layers=1)
    assert model(src, dec_in).shape == (4, toy.MAX_LEN + 1, toy.VOCAB)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):  # it can learn: the loss on one batch falls from about ln(13)
        logits = model(src, dec_in).flatten(0, 1)
        loss = torch.nn.functional.cross_entropy(logits, reply.flatten(), ignore_index=toy.PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert toy.train(model, 2, 4, gen, say=lambda *a: None)[-1] > 0
    assert 0.0 <= toy.exact_replies(model, src, reply) <= 1.0
    args = ["--steps", "2", "--batch", "4", "--dim", "8", "--layers", "1", "--eval", "4", "--quiet"]
    assert 0.0 <= toy.main(args) <= 1.0


# ---------------------------------------------------------------------------------------------
# The block classes' vocabulary (the builders keep Keras's names)


def test_block_defaults_and_keras_names():
    block = SelfAttentionBlock(16)
    assert block.attention.num_heads == 8 and block.attention.key_dim == 2  # head_dim = D // num_heads
    assert block.attention.value_dim == 2 and block.att_norm1.eps == 1e-3
    cross = CrossAttentionBlock(16, num_heads=4, value_head_dim=3)
    assert cross.attention.context_dim == 16 and cross.attention.value_dim == 3
    keras = {"num_heads": 2, "key_dim": 4, "value_dim": 3, "dropout": 0.1, "use_bias": False}
    expected = {"num_heads": 2, "head_dim": 4, "value_head_dim": 3, "attn_drop": 0.1, "bias": False}
    assert keras_block_kwargs({**keras, "output_shape": 8}, 8, "self_attention") == expected
    built = self_attention((5, 8), num_heads=2, key_dim=4, value_dim=3, dropout=0.2, use_bias=False)
    direct = SelfAttentionBlock(8, 2, head_dim=4, value_head_dim=3, attn_drop=0.2, bias=False, seq_len=5)
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in direct.state_dict().items()
    }
    assert built.attention.dropout.p == 0.2 and built.attention.query.bias is None
    with pytest.raises(ValueError, match="head_dim must be >= 1, got 0"):
        SelfAttentionBlock(8, head_dim=0)
    with pytest.raises(ValueError, match="attn_drop must be <= 1"):
        CrossAttentionBlock(8, attn_drop=2.0)
    with pytest.raises(TypeError, match="bias must be a bool"):
        SelfAttentionBlock(8, bias=1)
    with pytest.raises(ValueError, match="eps must be > 0"):
        SelfAttentionBlock(8, eps=-1.0)


def test_need_weights_returns_the_reference_weights():
    block = randomize(SelfAttentionBlock(8, 2, 4, causal=True)).double().eval()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    out, weights = block(x, need_weights=True)
    torch.testing.assert_close(out, block(x), atol=1e-12, rtol=1e-12)
    sd = {k: v for k, v in block.attention.state_dict().items()}
    q = torch.einsum("bld,dhk->bhlk", x, sd["query.kernel"]) + sd["query.bias"].unsqueeze(1)
    k = torch.einsum("bld,dhk->bhlk", x, sd["key.kernel"]) + sd["key.bias"].unsqueeze(1)
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~causal_keep(6, 6), float("-inf"))  # sqrt(4)
    torch.testing.assert_close(weights, scores.softmax(-1), atol=1e-12, rtol=1e-12)
    cross = randomize(CrossAttentionBlock(8, 6, 2, 4)).double().eval()
    ctx = torch.randn(2, 7, 6, dtype=torch.float64)
    keep = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    y, w = cross(x, ctx, context_mask=keep, need_weights=True)
    assert w.shape == (2, 2, 6, 7) and (w[1, :, :, 3:] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 6, dtype=torch.float64))
    torch.testing.assert_close(y, cross(x, ctx, context_mask=keep), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cls", [SelfAttentionBlock, CrossAttentionBlock, FeedForwardBlock])
def test_blocks_take_device_and_dtype(cls):
    args = (8, 16) if cls is FeedForwardBlock else (8,)
    meta = cls(*args, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    double = cls(*args, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in double.parameters())
