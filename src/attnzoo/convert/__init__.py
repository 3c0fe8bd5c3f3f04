"""Converters into attnzoo: foreign modules and weights -> attnzoo modules with the same numbers.

- `from_torch`: ``torch.nn.MultiheadAttention`` -> `attnzoo.compat.MultiheadAttention`;
- `from_torchvision`: torchvision's Swin ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2``
  -> ``attnzoo.compat.ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2`` (keyed by dotted name:
  torchvision is imported only when converting);
- `from_timm`: timm's ``create_attn`` modules -> the canonical classes (`attnzoo.convert.timm`);
- `from_fightingcv`: fightingcv-attention's modules -> the canonical classes
  (`attnzoo.convert.fightingcv`);
- `from_keras` / `load_keras_weights` (from `attnzoo.blocks.convert`): Keras blocks
  -> the prefix-named PyTorch blocks.

Module converters sit in one table keyed by the foreign class (`attnzoo.convert.registry`);
`convert` dispatches on it, and ``attnzoo.replace(model, ForeignClass)`` uses it to swap every
instance of a known class in a model, weights included (where the converted module is called
differently, as fightingcv's EMSA, GlobalFilter and DAT, `replace` swaps in a subclass called the
foreign way: `attnzoo.convert.fightingcv_calls`).
"""

from torch import nn

from attnzoo.blocks.convert import from_keras, keras_layer_weights, load_keras_weights
from attnzoo.convert.fightingcv import FIGHTINGCV_CONVERTERS, from_fightingcv
from attnzoo.convert.fightingcv_calls import IN_PLACE as FIGHTINGCV_IN_PLACE
from attnzoo.convert.registry import (
    Converter,
    convert,
    converter_for,
    in_place_converter_for,
    known,
    register,
    register_in_place,
)
from attnzoo.convert.timm import TIMM_CONVERTERS, from_timm
from attnzoo.convert.torch import from_torch
from attnzoo.convert.torchvision import TORCHVISION_CLASSES, from_torchvision

register(nn.MultiheadAttention, from_torch)
for _name in TORCHVISION_CLASSES:
    register(_name, from_torchvision)
for _name in TIMM_CONVERTERS:
    register(_name, from_timm)
for _name in FIGHTINGCV_CONVERTERS:
    register(_name, from_fightingcv)
for _name, _converter in FIGHTINGCV_IN_PLACE.items():
    register_in_place(_name, _converter)

__all__ = [
    "Converter",
    "convert",
    "converter_for",
    "from_fightingcv",
    "from_keras",
    "from_timm",
    "from_torch",
    "from_torchvision",
    "in_place_converter_for",
    "keras_layer_weights",
    "known",
    "load_keras_weights",
    "register",
    "register_in_place",
]
