"""fightingcv -> attnzoo for spatial token mixers: fightingcv-attention's `CrissCrossAttention`,
`AxialAttention`, `OutlookAttention`, `MobileViTv2Attention`, ... -> the canonical classes.

`CONVERTERS` maps fightingcv's dotted class names (xmu-xiaoma666/External-Attention-pytorch, package
`fightingcv_attention`) to converters; `attnzoo.convert.fightingcv` adds them to
`FIGHTINGCV_CONVERTERS`. fightingcv is never imported here. Each result holds a copy of the module's
weights (same device, dtype and training flag) loaded with `strict=True`; where fightingcv only runs for
some options, the converter refuses the options it cannot run (the message says why).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnzoo.convert._timm_common import copy_norm_settings
from attnzoo.convert.fightingcv_existing import rename
from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.axial import AxialAttention
from attnzoo.mechanisms.criss_cross import CrissCrossAttention
from attnzoo.mechanisms.gfnet import GlobalFilter
from attnzoo.mechanisms.mobilevit import MobileViTBlock
from attnzoo.mechanisms.mobilevit_v2 import SeparableSelfAttention
from attnzoo.mechanisms.outlook import OutlookAttention
from attnzoo.mechanisms.vip import WeightedPermuteMLP

__all__ = ["CONVERTERS"]

_PACKAGE = "fightingcv_attention.attention"
WHO = "from_fightingcv"


def criss_cross_from_fightingcv(module: Any) -> CrissCrossAttention:
    """`CrissCrossAttention(in_dim)` -> `CrissCrossAttention(in_dim, rd_channels=in_dim // 8)`; same keys."""
    rd = module.query_conv.out_channels
    if rd < 1:
        raise refuse(module, f"in_dim={module.query_conv.in_channels} < 8 gives zero query channels", WHO)
    new = CrissCrossAttention(module.query_conv.in_channels, rd_channels=rd, **factory(module))
    return finish(new, module, module.state_dict())


def axial_from_fightingcv(module: Any) -> AxialAttention:
    """`AxialAttention(dim, num_dimensions=2, heads, dim_heads, dim_index=-1, sum_axial_out)` ->
    `AxialAttention(dim, heads, head_dim=dim_heads, sum_axes=sum_axial_out)`; `axial_attentions.0.fn`
    (the H axis) and `.1.fn` (W) become `attn_h` and `attn_w`, `to_q`/`to_kv`/`to_out` become
    `q`/`kv`/`proj`. Only channels-last 2-D inputs (`dim_index=-1` or 3) are represented."""
    if module.total_dimensions != 4:
        axes = module.total_dimensions - 2
        raise refuse(module, f"num_dimensions={axes}: only 2-D maps are supported", WHO)
    if module.dim_index != 3:
        where = module.dim_index
        raise refuse(module, f"dim_index={where}: only channels-last (B, H, W, C) is supported", WHO)
    perms = [list(a.permutation) for a in module.axial_attentions]
    if perms != [[0, 2, 1, 3], [0, 1, 2, 3]]:
        raise refuse(module, f"its axis permutations are {perms}, not H then W", WHO)
    fn = module.axial_attentions[0].fn
    new = AxialAttention(module.dim, fn.heads, head_dim=fn.dim_heads, sum_axes=module.sum_axial_out,
                         **factory(module))
    names = {"axial_attentions.0.fn.": "attn_h.", "axial_attentions.1.fn.": "attn_w."}
    state = rename(module.state_dict(), names)
    state = {k.replace(".to_q.", ".q.").replace(".to_kv.", ".kv.").replace(".to_out.", ".proj."): v
             for k, v in state.items()}
    return finish(new, module, state)


def outlook_from_fightingcv(module: Any) -> OutlookAttention:
    """`OutlookAttention(dim, num_heads, kernel_size=3, padding=1, stride=1, qkv_bias, attn_drop)` ->
    `OutlookAttention` with the same options and `proj_drop=attn_drop` (fightingcv reuses it); `v_pj`
    becomes `v`. fightingcv's unfold is `Unfold(kernel_size, dilation=padding, padding=stride)`, which
    gathers VOLO's windows only for `kernel_size=3, padding=1, stride=1`: other options are refused."""
    k, p, s = module.kernel_size, module.padding, module.stride
    if (k, p, s) != (3, 1, 1):
        raise refuse(
            module,
            f"kernel_size={k}, padding={p}, stride={s}: its Unfold(kernel_size, padding, stride) means "
            "dilation=padding, padding=stride, which gathers VOLO's windows only for 3, 1, 1",
            WHO,
        )
    new = OutlookAttention(
        module.dim, module.num_heads, kernel_size=k, padding=p, stride=s,
        qkv_bias=module.v_pj.bias is not None, attn_drop=module.attn_drop.p, proj_drop=module.proj_drop.p,
        **factory(module),
    )
    return finish(new, module, rename(module.state_dict(), {"v_pj.": "v."}))


def mobilevit_v2_from_fightingcv(module: Any) -> SeparableSelfAttention:
    """`MobileViTv2Attention(d_model)` -> `SeparableSelfAttention(d_model, act_layer=None)` (fightingcv
    has no ReLU on the values); `fc_i`, `fc_k`, `fc_v` are stacked into `qkv`, `fc_o` becomes `proj`."""
    parts = (module.fc_i, module.fc_k, module.fc_v, module.fc_o)
    if any(p.bias is None for p in parts):
        raise refuse(module, "its projections have no bias (fightingcv's have one)", WHO)
    new = SeparableSelfAttention(module.d_model, act_layer=None, **factory(module))
    state = {
        "qkv.weight": torch.cat([p.weight for p in parts[:3]]).detach(),
        "qkv.bias": torch.cat([p.bias for p in parts[:3]]).detach(),
        "proj.weight": module.fc_o.weight.detach(),
        "proj.bias": module.fc_o.bias.detach(),
    }
    return finish(new, module, state)


def mobilevit_from_fightingcv(module: Any) -> MobileViTBlock:
    """`MobileViTAttention(in_channel, dim, kernel_size, patch_size)` -> `MobileViTBlock` with its
    hard-coded transformer (3 layers, 8 heads of 64, MLP 1024) and `norm_layer=None, act_layer=None,
    final_norm=False, qkv_bias=False`; `trans.layers.i.0` / `.1` become `layers.i` (`norm1`, `qkv`,
    `proj`, `norm2`, `fc1`, `fc2`), `convN` become `convN.0`."""
    layers = module.trans.layers
    attn = layers[0][0].fn
    if not isinstance(attn.to_out, nn.Sequential):
        raise refuse(module, "its attention has no output projection (heads == 1, head_dim == dim)", WHO)
    if module.ph != module.pw:
        raise refuse(module, f"patch sizes {module.ph} x {module.pw} differ", WHO)
    channels, dim = module.conv1.in_channels, module.conv2.out_channels
    new = MobileViTBlock(
        channels, transformer_dim=dim, kernel_size=module.conv1.kernel_size[0], patch_size=module.ph,
        depth=len(layers), num_heads=attn.heads, head_dim=attn.to_qkv.out_features // 3 // attn.heads,
        mlp_dim=layers[0][1].fn.net[0].out_features, qkv_bias=False, norm_layer=None, act_layer=None,
        final_norm=False, **factory(module),
    )
    names = {f"conv{i}.": f"conv{i}.0." for i in range(1, 5)}
    for i in range(len(layers)):
        names |= {
            f"trans.layers.{i}.0.ln.": f"layers.{i}.norm1.",
            f"trans.layers.{i}.0.fn.to_qkv.": f"layers.{i}.qkv.",
            f"trans.layers.{i}.0.fn.to_out.0.": f"layers.{i}.proj.",
            f"trans.layers.{i}.1.ln.": f"layers.{i}.norm2.",
            f"trans.layers.{i}.1.fn.net.0.": f"layers.{i}.fc1.",
            f"trans.layers.{i}.1.fn.net.3.": f"layers.{i}.fc2.",
        }
    copy_norm_settings(module, new, WHO)  # the LayerNorms' eps
    return finish(new, module, rename(module.state_dict(), names))


def vip_from_fightingcv(module: Any) -> WeightedPermuteMLP:
    """`WeightedPermuteMLP(dim, seg_dim, qkv_bias, proj_drop)` -> `WeightedPermuteMLP(dim, segment_dim,
    qkv_bias, attn_drop=0.1, proj_drop)`; `reweighting.fc1`/`fc2` become `fc1`/`fc2`, with `fc2`'s outputs
    reordered from fightingcv's (channel, width, height) to the authors' (height, width, channel)."""
    dim, mlp = module.proj.in_features, module.reweighting
    new = WeightedPermuteMLP(
        dim, module.seg_dim, qkv_bias=module.mlp_c.bias is not None, attn_drop=mlp.drop.p,
        proj_drop=module.proj_drop.p, **factory(module),
    )
    state = rename(module.state_dict(), {"reweighting.": ""})
    flip = [2, 1, 0]  # fightingcv's branch j -> the authors' 2 - j
    state["fc2.weight"] = state["fc2.weight"].reshape(dim, 3, -1)[:, flip].reshape(3 * dim, -1)
    state["fc2.bias"] = state["fc2.bias"].reshape(dim, 3)[:, flip].reshape(3 * dim)
    return finish(new, module, state)


def gfnet_from_fightingcv(module: Any) -> GlobalFilter:
    """`GlobalFilter(dim, h, w)` (tokens `(B, N, C)`, `w` frequencies) -> `GlobalFilter(dim,
    feat_size=(h, 2 (w - 1)))` on `(B, h, W, C)` maps, W = 2 (w - 1) or 2 w - 1; same `complex_weight`."""
    h, w, dim, _ = module.complex_weight.shape
    new = GlobalFilter(dim, feat_size=(h, max(1, 2 * (w - 1))), **factory(module))
    return finish(new, module, module.state_dict())


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    f"{_PACKAGE}.CrissCrossAttention.CrissCrossAttention": criss_cross_from_fightingcv,
    f"{_PACKAGE}.Axial_attention.AxialAttention": axial_from_fightingcv,
    f"{_PACKAGE}.OutlookAttention.OutlookAttention": outlook_from_fightingcv,
    f"{_PACKAGE}.MobileViTv2Attention.MobileViTv2Attention": mobilevit_v2_from_fightingcv,
    f"{_PACKAGE}.MobileViTAttention.MobileViTAttention": mobilevit_from_fightingcv,
    f"{_PACKAGE}.ViP.WeightedPermuteMLP": vip_from_fightingcv,
    f"{_PACKAGE}.gfnet.GlobalFilter": gfnet_from_fightingcv,
}
