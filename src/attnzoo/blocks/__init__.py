"""Prefix-named transformer blocks of seed 001: PyTorch modules, Keras builders, weight converters.

- `transformer`: the PyTorch blocks (`SelfAttentionBlock`, ...);
- `keras_attention`: `KerasMultiHeadAttention`, Keras' layout in PyTorch;
- `keras`: the Keras 3 builders (Keras imported on first use);
- `convert`: Keras -> PyTorch weights by layer name.
"""

from attnzoo.blocks.keras_attention import KerasMultiHeadAttention
from attnzoo.blocks.transformer import CrossAttentionBlock, FeedForwardBlock, SelfAttentionBlock

__all__ = ["CrossAttentionBlock", "FeedForwardBlock", "KerasMultiHeadAttention", "SelfAttentionBlock"]
