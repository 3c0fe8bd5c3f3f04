"""The Keras 3 builders (torch backend) and the Keras -> PyTorch converter: same weights, same output."""

from __future__ import annotations

import inspect
import os
import re
import warnings

import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("these tests run Keras on its torch backend (KERAS_BACKEND=torch)", allow_module_level=True)

import numpy as np  # noqa: E402  (Keras needs numpy, so it is installed here)

from attnzoo.blocks import keras as akeras  # noqa: E402
from attnzoo.blocks.convert import from_keras, keras_layer_weights, load_keras_weights  # noqa: E402
from attnzoo.blocks.transformer import CrossAttentionBlock, FeedForwardBlock, SelfAttentionBlock  # noqa: E402

ATOL, RTOL = 1e-5, 1e-5  # float32


def randomize(model, seed: int = 0):
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign((rng.standard_normal(tuple(w.shape)) * 0.5).astype("float32"))
    return model


def run_keras(model, *inputs):
    with torch.no_grad():
        return torch.as_tensor(model(*inputs, training=False)).detach()


def test_layer_and_model_names_are_the_tutorials():
    att = akeras.self_attention((20, 16), num_heads=2, key_dim=8)
    assert att.name == "att_att" and [layer.name for layer in att.layers] == [
        "att_in1",
        "att_attn1",
        "att_add1",
        "att_norm1",
    ]
    cross = akeras.cross_attention((20, 16), (10, 16), prefix="dec0", num_heads=2, key_dim=8)
    assert cross.name == "dec0_cross"
    assert [layer.name for layer in cross.layers] == [
        "dec0_ctx2",
        "dec0_in2",
        "dec0_attn2",
        "dec0_add2",
        "dec0_norm2",
    ]
    ff = akeras.feed_forward((20, 16), 16, 32, prefix="enc1")
    assert ff.name == "enc1_ff"
    assert [layer.name for layer in ff.layers] == [
        "enc1_in3",
        "enc1_ff1",
        "enc1_ff2",
        "enc1_drop",
        "enc1_add3",
        "enc1_norm3",
    ]
    # The PyTorch twins list the same names.
    assert from_keras(att).layer_names == tuple(layer.name for layer in att.layers)
    assert from_keras(cross).layer_names == tuple(layer.name for layer in cross.layers)
    assert from_keras(ff).layer_names == tuple(layer.name for layer in ff.layers)


def test_keras_builders_validate_like_the_pytorch_ones():
    with pytest.raises(ValueError, match="prefix must be an identifier fragment"):
        akeras.self_attention((5, 8), prefix="a/b", num_heads=2, key_dim=4)
    with pytest.raises(ValueError, match="input_shape"):
        akeras.feed_forward((8,), 8, 16)
    with pytest.raises(TypeError, match="mask must be a bool"):
        akeras.self_attention((5, 8), mask="yes", num_heads=2, key_dim=4)


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("options", [{}, {"value_dim": 5, "use_bias": False}])
def test_self_attention_converts_to_the_same_output(mask, options):
    model = randomize(
        akeras.self_attention((6, 8), prefix="enc0", mask=mask, num_heads=3, key_dim=4, **options)
    )
    block = from_keras(model).eval()
    assert isinstance(block, SelfAttentionBlock) and block.causal is mask and block.prefix == "enc0"
    x = torch.randn(3, 6, 8)
    torch.testing.assert_close(block(x), run_keras(model, x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("mask", [False, True])
def test_self_attention_with_padding_mask(mask):
    model = randomize(akeras.self_attention((6, 8), mask=mask, num_heads=2, key_dim=4), seed=1)
    block = from_keras(model).eval()
    x = torch.randn(3, 6, 8)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    # The model's own layers, applied with Keras's key-padding mask (value_mask, (B, S)).
    attention, add, norm = (model.get_layer(f"att_{n}") for n in ("attn1", "add1", "norm1"))
    with torch.no_grad():
        attended = attention(query=x, value=x, key=x, value_mask=pad, use_causal_mask=mask, training=False)
        expected = torch.as_tensor(norm(add([x, attended]))).detach()
    torch.testing.assert_close(block(x, padding_mask=pad), expected, atol=ATOL, rtol=RTOL)
    # An explicit (B, L, S) attention_mask means the same to both.
    keep = pad[:, None, :].expand(3, 6, 6)
    with torch.no_grad():
        attended = attention(
            query=x, value=x, key=x, attention_mask=keep, use_causal_mask=mask, training=False
        )
        expected = torch.as_tensor(norm(add([x, attended]))).detach()
    torch.testing.assert_close(block(x, attention_mask=keep), expected, atol=ATOL, rtol=RTOL)


def test_cross_attention_converts_to_the_same_output():
    model = randomize(
        akeras.cross_attention((5, 8), (7, 6), prefix="dec1", num_heads=2, key_dim=3, value_dim=4)
    )
    block = from_keras(model).eval()
    assert isinstance(block, CrossAttentionBlock) and block.context_len == 7
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 7, 6)
    torch.testing.assert_close(block(x, ctx), run_keras(model, [(ctx, x)]), atol=ATOL, rtol=RTOL)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    attention, add, norm = (model.get_layer(f"dec1_{n}") for n in ("attn2", "add2", "norm2"))
    with torch.no_grad():
        expected = torch.as_tensor(
            norm(add([attention(query=x, value=ctx, key=ctx, value_mask=keep), x]))
        ).detach()
    torch.testing.assert_close(block(x, ctx, context_mask=keep), expected, atol=ATOL, rtol=RTOL)


def test_feed_forward_converts_to_the_same_output():
    model = randomize(akeras.feed_forward((None, 8), 8, 24, dropout=0.3, prefix="enc1"))
    block = from_keras(model).eval()
    assert (
        isinstance(block, FeedForwardBlock)
        and block.enc1_drop.p == pytest.approx(0.3)
        and block.seq_len is None
    )
    x = torch.randn(2, 9, 8)
    torch.testing.assert_close(block(x), run_keras(model, x), atol=ATOL, rtol=RTOL)


def test_a_tutorial_encoder_layer_converts_by_name():
    """The tutorial's encoder: Sequential(self_attention, feed_forward) sharing one prefix per layer."""
    shape = (6, 8)
    layers = [keras.layers.Input(shape=shape, name="enc_in0")]
    for i in range(2):
        layers += [
            akeras.self_attention(shape, prefix=f"enc{i}", num_heads=2, key_dim=4),
            akeras.feed_forward(shape, 8, 16, prefix=f"enc{i}"),
        ]
    model = randomize(keras.Sequential(layers, name="encoder"), seed=2)
    from attnzoo.compat import feed_forward, self_attention

    torch_model = torch.nn.Sequential(
        *[
            module
            for i in range(2)
            for module in (
                self_attention(shape, prefix=f"enc{i}", num_heads=2, key_dim=4),
                feed_forward(shape, 8, 16, prefix=f"enc{i}"),
            )
        ]
    )
    load_keras_weights(torch_model, model).eval()
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(torch_model(x), run_keras(model, x), atol=ATOL, rtol=RTOL)


def test_converter_rejects_ambiguous_or_mismatched_targets():
    model = randomize(akeras.self_attention((6, 8), num_heads=2, key_dim=4))
    twice = torch.nn.Sequential(*(akeras_twin(model) for _ in range(2)))
    with pytest.raises(ValueError, match="matches several modules.*own prefix"):
        load_keras_weights(twice, model)
    wrong = SelfAttentionBlock(8, 2, 3)  # key_dim 3 instead of 4
    with pytest.raises(ValueError, match=r"att_attn1/query.kernel of shape \(8, 2, 3\).*got \(8, 2, 4\)"):
        load_keras_weights(wrong, model)
    other = SelfAttentionBlock(8, 2, 4, prefix="enc0")
    with pytest.raises(ValueError, match="no PyTorch module named 'att_attn1'"):
        load_keras_weights(other, model)
    assert set(keras_layer_weights(model)) == {"att_attn1", "att_norm1"}
    with pytest.raises(ValueError, match="from_keras expects a model named"):
        from_keras(keras.Sequential([keras.layers.Input((3,)), keras.layers.Dense(2)], name="plain"))


def akeras_twin(model) -> SelfAttentionBlock:
    return SelfAttentionBlock(8, 2, 4, prefix="att")


@pytest.mark.parametrize("option", [{"attention_axes": (2,)}, {"use_gate": True}, {"sliding_window": 2}])
def test_from_keras_refusal_names_what_it_converts_and_what_it_got(option):
    (name, value), = option.items()
    if name not in inspect.signature(keras.layers.MultiHeadAttention).parameters:
        pytest.skip(f"this Keras has no MultiHeadAttention({name}=...)")
    model = akeras.self_attention((6, 8), prefix="p", num_heads=2, key_dim=4, **option)
    expected = r"attention_axes None or \(1,\) \(the sequence axis\), use_gate=False and sliding_window=None"
    given = rf"layer 'p_attn1' has \{{'{name}': {re.escape(repr(value))}\}}"
    with pytest.raises(ValueError, match=rf"{expected}; {given}"):
        from_keras(model)


def test_load_keras_weights_names_a_target_without_the_keras_parameter():
    """A module of another kind under the layer's name (or one without biases): named, no AttributeError."""
    model = randomize(akeras.self_attention((6, 8), num_heads=2, key_dim=4))
    other = torch.nn.Module()
    other.add_module("att_attn1", torch.nn.MultiheadAttention(8, 2))
    other.add_module("att_norm1", torch.nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"att_attn1/query.kernel has no parameter 'query.kernel' in "
                                         r"MultiheadAttention 'att_attn1', which has \['in_proj_bias', "):
        load_keras_weights(other, model)
    no_bias = SelfAttentionBlock(8, 2, 4, bias=False)
    with pytest.raises(ValueError, match=r"att_attn1/query.bias has no parameter 'query.bias'"):
        load_keras_weights(no_bias, model)
    load_keras_weights(no_bias, model, strict=False)  # not strict: the kernels load, the biases are left out
    kernel = keras_layer_weights(model)["att_attn1"]["query.kernel"]
    torch.testing.assert_close(no_bias.attention.query.kernel.detach(), kernel, atol=0, rtol=0)


def test_keras_layer_weights_reads_the_layer_normalization_weights_that_exist():
    x = keras.Input((6, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras deprecates rms_scaling but still builds it
        try:
            norm = keras.layers.LayerNormalization(rms_scaling=True, name="rms")
        except TypeError:
            pytest.skip("this Keras has no LayerNormalization(rms_scaling=...)")
    model = randomize(keras.Model(x, norm(x), name="m"))
    weights = keras_layer_weights(model)["rms"]  # gamma only: rms_scaling makes no beta whatever `center` is
    assert set(weights) == {"weight"}
    torch.testing.assert_close(weights["weight"], torch.as_tensor(norm.gamma.numpy()), atol=0, rtol=0)
