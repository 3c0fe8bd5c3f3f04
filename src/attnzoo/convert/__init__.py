"""Converters into attnzoo: foreign modules and weights -> attnzoo modules with the same numbers.

- :func:`from_torch`: ``torch.nn.MultiheadAttention`` -> :class:`attnzoo.compat.MultiheadAttention`;
- :func:`from_timm`: timm's attention layers -> attnzoo's canonical classes;
- :func:`from_keras` / :func:`load_keras_weights` (from :mod:`attnzoo.blocks.convert`): Keras blocks
  -> the prefix-named PyTorch blocks.

Module converters sit in one table keyed by the foreign class (:mod:`attnzoo.convert.registry`);
:func:`convert` dispatches on it, and ``attnzoo.replace(model, ForeignClass)`` uses it to swap every
instance of a known class in a model, weights included.
"""

from torch import nn

from attnzoo.blocks.convert import from_keras, keras_layer_weights, load_keras_weights
from attnzoo.convert.registry import Converter, convert, converter_for, known, register
from attnzoo.convert.timm import TIMM_CONVERTERS, from_timm
from attnzoo.convert.torch import from_torch

register(nn.MultiheadAttention, from_torch)
for _timm_class in TIMM_CONVERTERS:
    register(_timm_class, from_timm)

__all__ = [
    "Converter",
    "convert",
    "converter_for",
    "from_keras",
    "from_timm",
    "from_torch",
    "keras_layer_weights",
    "known",
    "load_keras_weights",
    "register",
]
