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
instance of a known class in a model, weights included.
"""

from torch import nn

from attnzoo.blocks.convert import from_keras, keras_layer_weights, load_keras_weights
from attnzoo.convert.fightingcv import FIGHTINGCV_CALL_CHANGES, FIGHTINGCV_CONVERTERS, from_fightingcv
from attnzoo.convert.registry import (
    Converter,
    call_change,
    convert,
    converter_for,
    known,
    register,
    register_call_change,
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
for _name, _reason in FIGHTINGCV_CALL_CHANGES.items():
    register_call_change(_name, _reason)

__all__ = [
    "Converter",
    "call_change",
    "convert",
    "converter_for",
    "from_fightingcv",
    "from_keras",
    "from_timm",
    "from_torch",
    "from_torchvision",
    "keras_layer_weights",
    "known",
    "load_keras_weights",
    "register",
    "register_call_change",
]
