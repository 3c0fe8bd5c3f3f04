"""Keras 3 builders of seed 001's transformer blocks, with exactly the tutorial's layer names.

The optional extra `pip install 'attnzoo[keras]'`; Keras is imported when a builder first runs,
never at `import attnzoo`. Keras needs a backend: when `KERAS_BACKEND` is unset and `keras.json`
names no installed backend (Keras writes one naming its default, TensorFlow, on its first import),
attnzoo selects `torch` (already a dependency) before importing Keras. The PyTorch twins are in
`attnzoo.blocks.transformer`, and `attnzoo.blocks.convert.from_keras` copies the weights over.

Layer names (`prefix="att"` for the attention builders, `"ff"` for the feed-forward one):

=================  ==========================================================  ==============
builder            layers, in order                                            model name
=================  ==========================================================  ==============
self_attention     `att_in1`, `att_attn1`, `att_add1`, `att_norm1`     `att_att`
cross_attention    `att_ctx2`, `att_in2`, `att_attn2`, `att_add2`,     `att_cross`
                   `att_norm2`
feed_forward       `ff_in3`, `ff_ff1`, `ff_ff2`, `ff_drop`,            `ff_ff`
                   `ff_add3`, `ff_norm3`
=================  ==========================================================  ==============
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from attnzoo.blocks.transformer import check_input_shape, check_prefix

__all__ = ["self_attention", "cross_attention", "feed_forward", "import_keras"]


def _configured_backend() -> str:
    """The backend `keras.json` names; Keras's default `"tensorflow"` without a readable one."""
    home = os.path.expanduser(os.environ.get("KERAS_HOME", os.path.join("~", ".keras")))
    try:
        with open(os.path.join(home, "keras.json")) as f:
            backend = json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"
    return backend if isinstance(backend, str) else "tensorflow"


def import_keras() -> ModuleType:
    """Import Keras 3 (choosing the torch backend when nothing else is configured), or explain why not."""
    if "keras" not in sys.modules and not os.environ.get("KERAS_BACKEND"):
        # Keras's first import writes a keras.json naming "tensorflow" even when KERAS_BACKEND chose
        # another backend, so the file's mere existence says nothing: it counts if its backend is installed.
        backend = _configured_backend()
        if not (backend.isidentifier() and importlib.util.find_spec(backend) is not None):
            os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError as err:
        raise ImportError(
            "attnzoo.blocks.keras needs Keras 3 and an installed backend: pip install 'attnzoo[keras]' "
            "and set KERAS_BACKEND=torch to use the PyTorch attnzoo already needs "
            f"(importing keras failed: {err})"
        ) from err
    version = str(getattr(keras, "__version__", "0"))
    if int(version.split(".")[0]) < 3:
        raise ImportError(
            f"attnzoo.blocks.keras needs Keras >= 3 (pip install 'attnzoo[keras]'), found {version}"
        )
    return keras


def _check_mask_flag(mask: object) -> bool:
    if not isinstance(mask, bool):
        raise TypeError(
            f"self_attention: mask must be a bool (causal or not), got {type(mask).__name__} {mask!r}"
        )
    return mask


def self_attention(
    input_shape: Sequence[int | None], prefix: str = "att", mask: bool = False, **kwargs: Any
) -> Any:
    """Post-norm self-attention block as a `keras.Model` named `{prefix}_att`.

    Args:
        input_shape: `(L, D)` without the batch (L may be None).
        prefix: Prepended to every layer name so several blocks fit in one model. Default: `"att"`.
        mask: Causal mask (`use_causal_mask`), for decoders. Default: False.
        **kwargs: Passed to `keras.layers.MultiHeadAttention` (`num_heads`, `key_dim`, ...).

    Shape:
        - Input `(B, L, D)`; output `(B, L, D)`.
    """
    check_prefix(prefix, "self_attention")
    check_input_shape(input_shape, "self_attention")
    causal = _check_mask_flag(mask)
    keras = import_keras()
    layers = keras.layers
    x = layers.Input(shape=tuple(input_shape), dtype="float32", name=f"{prefix}_in1")
    attention = layers.MultiHeadAttention(name=f"{prefix}_attn1", **kwargs)
    attended = attention(query=x, value=x, key=x, use_causal_mask=causal)
    y = layers.LayerNormalization(name=f"{prefix}_norm1")(layers.Add(name=f"{prefix}_add1")([x, attended]))
    return keras.Model(inputs=x, outputs=y, name=f"{prefix}_att")


def cross_attention(
    input_shape: Sequence[int | None], context_shape: Sequence[int | None], prefix: str = "att", **kwargs: Any
) -> Any:
    """Post-norm cross-attention block as a `keras.Model` named `{prefix}_cross`.

    Queries come from the input, keys and values from the context. As the tutorial, the model's
    inputs are `[(context, x)]`: call it as `model([(context, x)])`.

    Args:
        input_shape: `(L, D)` of the input. context_shape: `(S, E)` of the context.
        prefix: Prepended to every layer name. Default: `"att"`.
        **kwargs: Passed to `keras.layers.MultiHeadAttention`.

    Shape:
        - context `(B, S, E)`, input `(B, L, D)`; output `(B, L, D)`.
    """
    check_prefix(prefix, "cross_attention")
    check_input_shape(input_shape, "cross_attention")
    check_input_shape(context_shape, "cross_attention", "context_shape")
    keras = import_keras()
    layers = keras.layers
    context = layers.Input(shape=tuple(context_shape), dtype="float32", name=f"{prefix}_ctx2")
    x = layers.Input(shape=tuple(input_shape), dtype="float32", name=f"{prefix}_in2")
    attended = layers.MultiHeadAttention(name=f"{prefix}_attn2", **kwargs)(
        query=x, value=context, key=context
    )
    y = layers.LayerNormalization(name=f"{prefix}_norm2")(layers.Add(name=f"{prefix}_add2")([attended, x]))
    return keras.Model(inputs=[(context, x)], outputs=y, name=f"{prefix}_cross")


def feed_forward(
    input_shape: Sequence[int | None], model_dim: int, ff_dim: int, dropout: float = 0.1, prefix: str = "ff"
) -> Any:
    """Post-norm position-wise feed-forward block as a `keras.Model` named `{prefix}_ff`.

    Layers: `{prefix}_in3`, `{prefix}_ff1` (Dense ff_dim, ReLU), `{prefix}_ff2` (Dense
    model_dim), `{prefix}_drop`, `{prefix}_add3`, `{prefix}_norm3`.

    Args:
        input_shape: `(L, D)`. model_dim: Output size (D, for the residual). ff_dim: Hidden size.
        dropout: Dropout rate. Default: 0.1. prefix: Default: `"ff"`.

    Shape:
        - Input `(B, L, D)`; output `(B, L, model_dim)`.
    """
    check_prefix(prefix, "feed_forward")
    _, dim = check_input_shape(input_shape, "feed_forward")
    if model_dim != dim:
        raise ValueError(
            f"feed_forward expects model_dim = input_shape[-1] = {dim} (residual Add), got {model_dim!r}"
        )
    keras = import_keras()
    layers = keras.layers
    x = layers.Input(shape=tuple(input_shape), dtype="float32", name=f"{prefix}_in3")
    hidden = layers.Dense(ff_dim, activation="relu", name=f"{prefix}_ff1")(x)
    out = layers.Dropout(dropout, name=f"{prefix}_drop")(
        layers.Dense(model_dim, name=f"{prefix}_ff2")(hidden)
    )
    y = layers.LayerNormalization(name=f"{prefix}_norm3")(layers.Add(name=f"{prefix}_add3")([x, out]))
    return keras.Model(inputs=x, outputs=y, name=f"{prefix}_ff")
