"""Converters into attnzoo: foreign modules and weights -> attnzoo modules with the same numbers.

- `from_torch`: ``torch.nn.MultiheadAttention`` -> `attnzoo.compat.MultiheadAttention`;
- `from_fightingcv`: fightingcv's attention modules -> the canonical classes (`attnzoo.convert.fightingcv`);
- `from_keras` / `load_keras_weights` (from `attnzoo.blocks.convert`): Keras blocks
  -> the prefix-named PyTorch blocks.

Module converters sit in one table keyed by the foreign class (`attnzoo.convert.registry`);
`convert` dispatches on it, and ``attnzoo.replace(model, ForeignClass)`` uses it to swap every
instance of a known class in a model, weights included.
"""

from torch import nn

from attnzoo.blocks.convert import from_keras, keras_layer_weights, load_keras_weights
from attnzoo.convert.fightingcv import FIGHTINGCV_CONVERTERS, from_fightingcv
from attnzoo.convert.registry import Converter, convert, converter_for, known, register
from attnzoo.convert.torch import from_torch

register(nn.MultiheadAttention, from_torch)
for _name in FIGHTINGCV_CONVERTERS:
    register(_name, from_fightingcv)

__all__ = [
    "Converter",
    "convert",
    "converter_for",
    "from_fightingcv",
    "from_keras",
    "from_torch",
    "keras_layer_weights",
    "known",
    "load_keras_weights",
    "register",
]
