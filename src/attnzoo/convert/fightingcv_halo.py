"""fightingcv -> attnzoo for halo attention: fightingcv-attention's `HaloAttention.HaloAttention` ->
`attnzoo.mechanisms.halo_fightingcv.FightingcvHaloAttention` (the canonical `HaloAttention` with
fightingcv's inverted padding mask and output projection, whose numbers fightingcv computes).

`CONVERTERS` maps fightingcv's dotted class name to the converter; `attnzoo.convert.fightingcv` adds it
to `FIGHTINGCV_CONVERTERS`. fightingcv is never imported here. Weights map exactly: `to_q` -> `q`,
`to_out` -> `proj` (Linear (o, i) -> 1x1 convolution (o, i, 1, 1)), `to_kv` -> `kv` with its rows
regrouped per head (fightingcv: all keys, then all values; canonical: keys and values of head 0, then
head 1, ...), `rel_pos_emb.rel_height` / `rel_width` -> `pos_embed.height_rel` / `width_rel` (the same
offset index `w - 1 + j - i`, key j in the window, query i in the block). What fightingcv asserts on
at run time (H or W no multiple of `block_size`, input channels other than `dim`) the converted module
refuses with `ValueError`; a module whose layers no longer have fightingcv's shapes is refused with
`TypeError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.halo_fightingcv import FightingcvHaloAttention

__all__ = ["CONVERTERS"]

WHO = "from_fightingcv"


def _linear(module: Any, layer: Any, name: str, shape: tuple[int, int], bias: bool) -> Tensor:
    """`layer`'s weight as a 1x1 convolution weight, after checking it is fightingcv's Linear."""
    if not isinstance(layer, nn.Linear) or (layer.out_features, layer.in_features) != shape:
        raise refuse(module, f"its {name} is not an nn.Linear({shape[1]}, {shape[0]})", WHO)
    if (layer.bias is not None) != bias:
        raise refuse(module, f"its {name} {'lacks a' if bias else 'has a'} bias", WHO)
    return layer.weight.detach()[:, :, None, None]  # (out, in) -> (out, in, 1, 1)


def halo_from_fightingcv(module: Any) -> FightingcvHaloAttention:
    """`HaloAttention(dim, block_size, halo_size, dim_head, heads)` -> `FightingcvHaloAttention(dim,
    num_heads=heads, head_dim=dim_head, block_size, halo_size)`."""
    dim, heads, block, halo = module.dim, module.heads, module.block_size, module.halo_size
    inner = module.to_q.out_features
    if inner % heads != 0:
        raise refuse(module, f"its to_q width {inner} is not a multiple of heads={heads}", WHO)
    head_dim = inner // heads
    if module.scale != head_dim**-0.5:
        raise refuse(module, f"its scale {module.scale} is not dim_head ** -0.5 ({head_dim ** -0.5})", WHO)
    win = block + 2 * halo
    rel = module.rel_pos_emb
    for name in ("rel_height", "rel_width"):
        table = getattr(rel, name)
        if tuple(table.shape) != (2 * win - 1, head_dim):
            raise refuse(module, f"its rel_pos_emb.{name} has shape {tuple(table.shape)}, not "
                                 f"{(2 * win - 1, head_dim)}", WHO)
    if rel.block_size != block:
        raise refuse(module, f"its rel_pos_emb.block_size {rel.block_size} is not block_size={block}", WHO)
    q = _linear(module, module.to_q, "to_q", (inner, dim), bias=False)
    kv = _linear(module, module.to_kv, "to_kv", (2 * inner, dim), bias=False)
    proj = _linear(module, module.to_out, "to_out", (dim, inner), bias=True)
    kv = kv.reshape(2, heads, head_dim, dim, 1, 1).transpose(0, 1)  # (h, [k, v], d, C, 1, 1)
    new = FightingcvHaloAttention(
        dim, num_heads=heads, head_dim=head_dim, block_size=block, halo_size=halo, **factory(module)
    )
    state = {
        "q.weight": q,
        "kv.weight": kv.reshape(2 * inner, dim, 1, 1),  # rows per head: its d keys, then its d values
        "pos_embed.height_rel": rel.rel_height.detach(),
        "pos_embed.width_rel": rel.rel_width.detach(),
        "proj.weight": proj,
        "proj.bias": module.to_out.bias.detach(),
    }
    return finish(new, module, state)


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "fightingcv_attention.attention.HaloAttention.HaloAttention": halo_from_fightingcv,
}
