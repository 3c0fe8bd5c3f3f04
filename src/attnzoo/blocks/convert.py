"""Keras -> PyTorch weights for the prefix-named blocks, matched by layer name.

This is what the `prefix` of seed 001's builders buys: every layer of a model built from the
blocks has a unique name (`enc0_attn1`, `dec1_ff2`, ...), and the PyTorch modules of
`attnzoo.blocks.transformer` carry the same names, so weights move by name alone, however the blocks are
nested. Layouts (Keras -> PyTorch):

- `MultiHeadAttention`: `query/key/value/attention_output` kernels and biases, unchanged
  (`KerasMultiHeadAttention` keeps the Keras shapes);
- `Dense`: `kernel` `(in, out)` -> `weight` `(out, in)` (transposed), `bias`;
- `LayerNormalization`: `gamma` -> `weight`, `beta` -> `bias`;
- `Embedding`: `embeddings` -> `weight`.

Keras is not imported here; the functions take Keras objects (any backend).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo.blocks.transformer import (
    CrossAttentionBlock,
    FeedForwardBlock,
    SelfAttentionBlock,
    keras_block_kwargs,
)

__all__ = ["keras_layer_weights", "load_keras_weights", "from_keras"]

_MHA_PARTS = (
    ("query", "query_dense"),
    ("key", "key_dense"),
    ("value", "value_dense"),
    ("attention_output", "output_dense"),
)


def _tensor(variable: Any) -> Tensor:
    value = getattr(variable, "value", variable)
    if isinstance(value, Tensor):  # the torch backend: the variable's own tensor
        return value.detach().cpu().clone()
    import numpy as np

    return torch.as_tensor(np.asarray(variable.numpy()).copy())


def _check_model(model: Any, caller: str) -> None:
    """Refuse what is not a Keras model up front: attribute look-ups below would fail on it with an
    AttributeError, or find no layers and convert nothing."""
    if all(hasattr(model, attr) for attr in ("layers", "get_layer", "name")):
        return
    missing = importlib.util.find_spec("keras") is None
    hint = " (Keras is not installed: pip install 'attnzoo[keras]')" if missing else ""
    raise TypeError(
        f"{caller} expects a Keras model (keras.Model, e.g. from attnzoo.blocks.keras's builders), "
        f"got {type(model).__module__}.{type(model).__qualname__}{hint}"
    )


def _walk(model: Any) -> Iterator[Any]:
    for layer in getattr(model, "layers", ()):
        if hasattr(layer, "layers") and type(layer).__name__ in ("Functional", "Sequential", "Model"):
            yield from _walk(layer)
        else:
            yield layer


def keras_layer_weights(model: Any) -> dict[str, dict[str, Tensor]]:
    """Every weighted layer of a Keras model (nested models included), by name, in PyTorch layout.

    Returns:
        `{layer_name: {parameter_name: tensor}}` with PyTorch parameter names relative to the
        module of the same name (`{"att_attn1": {"query.kernel": ..., ...}, "att_norm1":
        {"weight": ..., "bias": ...}}`).

    Raises:
        TypeError: `model` is not a Keras model.
        ValueError: two layers share a name (give each block its own `prefix`), or a layer with
            weights has a type this converter does not know.
    """
    _check_model(model, "keras_layer_weights")
    names = Counter(layer.name for layer in _walk(model))
    twice = sorted(n for n, c in names.items() if c > 1)
    if twice:
        raise ValueError(
            f"keras_layer_weights expects unique layer names (one prefix per block), got repeated {twice}"
        )
    out: dict[str, dict[str, Tensor]] = {}
    for layer in _walk(model):
        kind = type(layer).__name__
        if kind == "MultiHeadAttention":
            params = {}
            for ours, attr in _MHA_PARTS:
                dense = getattr(layer, attr)
                params[f"{ours}.kernel"] = _tensor(dense.kernel)
                if getattr(dense, "bias", None) is not None:
                    params[f"{ours}.bias"] = _tensor(dense.bias)
            out[layer.name] = params
        elif kind == "Dense":
            out[layer.name] = {"weight": _tensor(layer.kernel).t().contiguous()}
            if layer.use_bias:
                out[layer.name]["bias"] = _tensor(layer.bias)
        elif kind == "LayerNormalization":
            out[layer.name] = {}  # gamma/beta exist as scale/center/rms_scaling made them, hence the tests
            if getattr(layer, "gamma", None) is not None:
                out[layer.name]["weight"] = _tensor(layer.gamma)
            if getattr(layer, "beta", None) is not None:
                out[layer.name]["bias"] = _tensor(layer.beta)
        elif kind == "Embedding":
            out[layer.name] = {"weight": _tensor(layer.embeddings)}
        elif layer.weights:
            raise ValueError(
                f"keras_layer_weights: layer {layer.name!r} of type {kind} has weights it cannot convert"
            )
    return out


def load_keras_weights(module: nn.Module, model: Any, *, strict: bool = True) -> nn.Module:
    """Copy a Keras model's weights into the PyTorch sub-modules that carry the same layer names.

    Args:
        module: Any PyTorch module whose sub-modules are named like the Keras layers (the last
            component of the `named_modules()` name is matched), e.g. a stack of attnzoo blocks.
        model: The Keras model.
        strict: Every Keras weight and every PyTorch parameter must be matched. Default: True.

    Returns:
        `module`, with its parameters overwritten (dtype and device kept).

    Raises:
        TypeError: `model` is not a Keras model.
        ValueError: a name matches several PyTorch sub-modules, a shape differs (named with the
            expected and the given shape), or, with `strict`, something is left unmatched (a
            Keras weight the sub-module of its name has no parameter for included).
    """
    _check_model(model, "load_keras_weights")
    weights = keras_layer_weights(model)
    found: dict[str, list[tuple[str, nn.Module]]] = {}
    for path, sub in module.named_modules():
        found.setdefault(path.rsplit(".", 1)[-1], []).append((path, sub))
    loaded: set[str] = set()
    with torch.no_grad():
        for layer_name, params in weights.items():
            targets = found.get(layer_name, [])
            if len(targets) > 1:
                paths = [p for p, _ in targets]
                raise ValueError(
                    f"load_keras_weights: layer {layer_name!r} matches several modules {paths}; "
                    "give each block its own prefix"
                )
            if not targets:
                if strict:
                    raise ValueError(
                        f"load_keras_weights: no PyTorch module named {layer_name!r} for that Keras layer"
                    )
                continue
            path, sub = targets[0]
            own = dict(sub.named_parameters())
            for key, value in params.items():
                target = own.get(key)
                if target is None:  # another kind of module under the layer's name (or no bias)
                    if not strict:
                        continue
                    raise ValueError(
                        f"load_keras_weights: Keras weight {layer_name}/{key} has no parameter {key!r} "
                        f"in {type(sub).__name__} {path!r}, which has {sorted(own)}; Keras gives "
                        f"{sorted(params)}"
                    )
                if tuple(target.shape) != tuple(value.shape):
                    raise ValueError(
                        f"load_keras_weights expects {layer_name}/{key} of shape "
                        f"{tuple(target.shape)} (the PyTorch module's), got {tuple(value.shape)}"
                    )
                target.copy_(value)
                loaded.add(f"{path}.{key}" if path else key)
    missing = sorted(set(dict(module.named_parameters())) - loaded)
    if strict and missing:
        raise ValueError(f"load_keras_weights: PyTorch parameters without a Keras weight: {missing}")
    return module


def _input_shape(model: Any, name: str) -> tuple[int | None, int]:
    shape = tuple(model.get_layer(name).output.shape)[1:]  # drop the batch
    return shape[0], shape[1]


def _causal_flag(attention: Any) -> bool:
    """The `use_causal_mask` the model's graph called the attention layer with."""
    try:
        return bool(attention._inbound_nodes[0].arguments.kwargs.get("use_causal_mask", False))
    except (AttributeError, IndexError) as err:
        raise ValueError(
            f"from_keras could not read use_causal_mask from {attention.name!r} ({err}); build the "
            "PyTorch block yourself and use load_keras_weights"
        ) from err


def _mha_kwargs(layer: Any, dim: int) -> dict[str, Any]:
    """The block arguments (`head_dim`, ...) for a Keras MultiHeadAttention layer's config."""
    config = layer.get_config()
    unsupported = {k: config.get(k) for k in ("use_gate", "sliding_window") if config.get(k)}
    if config.get("attention_axes") not in (None, (1,), [1], (-2,), [-2]):
        unsupported["attention_axes"] = config["attention_axes"]
    if unsupported:
        raise ValueError(
            f"from_keras converts MultiHeadAttention with attention_axes None or (1,) (the sequence axis), "
            f"use_gate=False and sliding_window=None; layer {layer.name!r} has {unsupported}"
        )
    keys = ("num_heads", "key_dim", "value_dim", "dropout", "use_bias", "output_shape")
    return keras_block_kwargs({k: config[k] for k in keys}, dim, "from_keras")


def from_keras(model: Any) -> nn.Module:
    """The PyTorch block equal to a model from `attnzoo.blocks.keras`'s builders, weights copied.

    The builder and prefix come from the model's name (`{prefix}_att`, `{prefix}_cross`,
    `{prefix}_ff`), the sizes and options from its layers' configs (including
    `use_causal_mask`, read from the attention layer's call).

    Raises:
        TypeError: `model` is not a Keras model.
        ValueError: the model is not one of those three blocks.
    """
    _check_model(model, "from_keras")
    name = model.name
    prefix, _, kind = name.rpartition("_")
    if kind == "att" and prefix:
        attn = model.get_layer(f"{prefix}_attn1")
        causal = _causal_flag(attn)
        seq_len, dim = _input_shape(model, f"{prefix}_in1")
        eps = model.get_layer(f"{prefix}_norm1").epsilon
        block: nn.Module = SelfAttentionBlock(
            dim, **_mha_kwargs(attn, dim), causal=causal, prefix=prefix, seq_len=seq_len, eps=eps
        )
    elif kind == "cross" and prefix:
        seq_len, dim = _input_shape(model, f"{prefix}_in2")
        context_len, context_dim = _input_shape(model, f"{prefix}_ctx2")
        eps = model.get_layer(f"{prefix}_norm2").epsilon
        block = CrossAttentionBlock(
            dim,
            context_dim,
            **_mha_kwargs(model.get_layer(f"{prefix}_attn2"), dim),
            prefix=prefix,
            seq_len=seq_len,
            context_len=context_len,
            eps=eps,
        )
    elif kind == "ff" and prefix:
        seq_len, dim = _input_shape(model, f"{prefix}_in3")
        ff1 = model.get_layer(f"{prefix}_ff1")
        activation = ff1.get_config()["activation"]
        if activation != "relu":
            raise ValueError(f"from_keras expects {prefix}_ff1 with a relu activation, got {activation!r}")
        block = FeedForwardBlock(
            dim,
            ff1.units,
            model.get_layer(f"{prefix}_drop").rate,
            prefix=prefix,
            seq_len=seq_len,
            eps=model.get_layer(f"{prefix}_norm3").epsilon,
        )
    else:
        raise ValueError(
            f"from_keras expects a model named '<prefix>_att', '<prefix>_cross' or '<prefix>_ff' "
            f"(built by attnzoo.blocks.keras), got {name!r}"
        )
    return load_keras_weights(block, model)
