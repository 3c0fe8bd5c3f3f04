"""timm -> attnzoo for the attention of timm's ViT family: ViT's `Attention`, BEiT's, VOLO's (on maps
and for the class token), CaiT's talking heads and class attention, EVA's, CoaT's factorized
attention, `AttentionRope` (Qwen3-ViT, DeepSeek ViT), differential attention (`attn_layer='diff'`),
FastViT's and CrossViT's, the latent attention pool of the SigLIP ViTs, the PRR pool, the CLIP ResNets'
attention pool, MetaFormer's, NesT's, Visformer's, TNT's, GC ViT's, Hiera's and SAM 2's Hiera's -> the
`attnzoo.compat` classes that keep timm's constructors, calls and keys (`TimmAttention`,
`TimmBeitAttention`, `TimmVoloAttention`, `TimmClassAttention`, `TimmTalkingHeadAttention`,
`TimmCaitClassAttention`, `TimmEvaAttention`, `TimmRopeAttention`, `TimmDiffAttention`,
`TimmFastVitAttention`, `TimmCrossAttention`, `TimmAttentionPoolLatent`, `TimmAttentionPoolPrr`,
`TimmAttentionPool2d`, `TimmNestAttention`, `TimmVisformerAttention`, `TimmTntAttention`,
`TimmGcVitWindowAttention`, `TimmMaskUnitAttention`, `TimmSam2MultiScaleAttention`, `TimmFactorAttention`).

`CONVERTERS` maps timm's dotted class names to the converters; `attnzoo.convert.timm` adds them to
`TIMM_CONVERTERS`. timm is never imported here. The options each converter sets and the known
differences are listed in docs/interop.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from attnzoo.convert._timm_common import default_scale
from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.timm_attention import TimmAttention
from attnzoo.mechanisms.timm_beit import TimmBeitAttention
from attnzoo.mechanisms.timm_cait import TimmCaitClassAttention, TimmTalkingHeadAttention
from attnzoo.mechanisms.timm_coat import TimmFactorAttention
from attnzoo.mechanisms.timm_diff import TimmDiffAttention
from attnzoo.mechanisms.timm_eva import TimmEvaAttention, TimmRopeAttention
from attnzoo.mechanisms.timm_gcvit import TimmGcVitWindowAttention
from attnzoo.mechanisms.timm_hiera import TimmMaskUnitAttention
from attnzoo.mechanisms.timm_hieradet import TimmSam2MultiScaleAttention
from attnzoo.mechanisms.timm_pool2d import TimmAttentionPool2d
from attnzoo.mechanisms.timm_prr import TimmAttentionPoolPrr
from attnzoo.mechanisms.timm_vit_variants import (
    TimmAttentionPoolLatent,
    TimmCrossAttention,
    TimmFastVitAttention,
)
from attnzoo.mechanisms.timm_vit_variants_b import TimmNestAttention, TimmTntAttention, TimmVisformerAttention
from attnzoo.mechanisms.timm_volo import TimmClassAttention, TimmVoloAttention

__all__ = ["CONVERTERS"]


def _drops(module: Any) -> dict[str, Any]:
    """timm's module's two dropout rates, device and dtype, as constructor arguments."""
    return {"attn_drop": float(module.attn_drop.p), "proj_drop": float(module.proj_drop.p), **factory(module)}


def _check_scale(module: Any, head_dim: int) -> None:
    if not default_scale(module, head_dim):
        raise refuse(module, f"its scale {module.scale} is not head_dim ** -0.5")


def attention_from_timm(module: Any) -> TimmAttention:
    """ViT's `timm.layers.Attention` -> `attnzoo.compat.TimmAttention` (timm's call and keys; its
    q/k norms and scale norm are copied, whatever their class)."""
    qkv: nn.Linear = module.qkv
    _check_scale(module, module.head_dim)
    new = TimmAttention(
        qkv.in_features, module.num_heads, attn_head_dim=module.head_dim, dim_out=module.proj.out_features,
        qkv_bias=qkv.bias is not None, proj_bias=module.proj.bias is not None,
        gated=getattr(module, "gate", None) is not None, **_drops(module),
    )
    new.q_norm, new.k_norm, new.norm = (copy.deepcopy(m) for m in (module.q_norm, module.k_norm, module.norm))
    return finish(new, module, module.state_dict())


def beit_attention_from_timm(module: Any) -> TimmBeitAttention:
    """BEiT's `timm.models.beit.Attention` -> `attnzoo.compat.TimmBeitAttention` (timm's call and keys)."""
    qkv: nn.Linear = module.qkv
    head_dim = qkv.out_features // 3 // module.num_heads
    if qkv.bias is not None or not default_scale(module, head_dim):
        raise refuse(module, "its qkv has a bias or its scale is not head_dim ** -0.5")
    new = TimmBeitAttention(
        qkv.in_features, module.num_heads, qkv_bias=module.q_bias is not None,
        qkv_bias_separate=bool(module.qkv_bias_separate), window_size=module.window_size,
        attn_head_dim=head_dim, **_drops(module),
    )
    return finish(new, module, module.state_dict())


def volo_attention_from_timm(module: Any) -> TimmVoloAttention:
    """VOLO's `timm.models.volo.Attention` (on maps) -> `attnzoo.compat.TimmVoloAttention`."""
    qkv: nn.Linear = module.qkv
    new = TimmVoloAttention(qkv.in_features, module.num_heads, qkv_bias=qkv.bias is not None,
                            **_drops(module))
    new.scale = float(module.scale)
    return finish(new, module, module.state_dict())


def class_attention_from_timm(module: Any) -> TimmClassAttention:
    """VOLO's `timm.models.volo.ClassAttention` -> `attnzoo.compat.TimmClassAttention`."""
    q: nn.Linear = module.q
    new = TimmClassAttention(q.in_features, module.num_heads, head_dim=module.head_dim,
                             qkv_bias=q.bias is not None, **_drops(module))
    new.scale = float(module.scale)
    return finish(new, module, module.state_dict())


def _cait_scale(module: Any, dim: int) -> None:
    head_dim = dim // module.num_heads
    if dim % module.num_heads or not default_scale(module, head_dim):
        raise refuse(module, f"its scale {module.scale} is not (dim // num_heads) ** -0.5 or its "
                     f"{module.num_heads} heads do not divide dim {dim}")


def cait_class_attention_from_timm(module: Any) -> TimmCaitClassAttention:
    """CaiT's `timm.models.cait.ClassAttn` -> `attnzoo.compat.TimmCaitClassAttention`."""
    q: nn.Linear = module.q
    _cait_scale(module, q.in_features)
    new = TimmCaitClassAttention(q.in_features, module.num_heads, qkv_bias=q.bias is not None,
                                 **_drops(module))
    return finish(new, module, module.state_dict())


def talking_head_from_timm(module: Any) -> TimmTalkingHeadAttention:
    """CaiT's `timm.models.cait.TalkingHeadAttn` -> `attnzoo.compat.TimmTalkingHeadAttention`."""
    qkv: nn.Linear = module.qkv
    _cait_scale(module, qkv.in_features)
    new = TimmTalkingHeadAttention(qkv.in_features, module.num_heads, qkv_bias=qkv.bias is not None,
                                   **_drops(module))
    return finish(new, module, module.state_dict())


def eva_attention_from_timm(module: Any) -> TimmEvaAttention:
    """EVA's `timm.models.eva.EvaAttention` -> `attnzoo.compat.TimmEvaAttention` (timm's call and keys;
    its q/k norms and scale norm are copied, whatever their class)."""
    fused = module.qkv is not None
    dim = module.qkv.in_features if fused else module.q_proj.in_features
    _check_scale(module, module.head_dim)
    qkv_bias = module.q_bias is not None if fused else module.q_proj.bias is not None
    new = TimmEvaAttention(
        dim, module.num_heads, qkv_bias=qkv_bias, qkv_fused=fused,
        qkv_bias_separate=bool(module.qkv_bias_separate), num_prefix_tokens=module.num_prefix_tokens,
        attn_head_dim=module.head_dim, rotate_half=bool(getattr(module, "rotate_half", False)),
        scale_norm=False, gated=module.gate is not None, **_drops(module),
    )
    new.q_norm, new.k_norm, new.norm = (copy.deepcopy(m) for m in (module.q_norm, module.k_norm, module.norm))
    return finish(new, module, module.state_dict())


def rope_attention_from_timm(module: Any) -> TimmRopeAttention:
    """timm's `layers.attention.AttentionRope` -> `attnzoo.compat.TimmRopeAttention` (timm's call and keys;
    its q/k norms and scale norm are copied, whatever their class)."""
    fused = module.qkv is not None
    first = module.qkv if fused else module.q_proj
    _check_scale(module, module.head_dim)
    new = TimmRopeAttention(
        first.in_features, module.num_heads, dim_out=module.proj.out_features,
        qkv_bias=first.bias is not None, qkv_fused=fused, num_prefix_tokens=module.num_prefix_tokens,
        attn_head_dim=module.head_dim, proj_bias=module.proj.bias is not None,
        rotate_half=bool(getattr(module, "rotate_half", False)),  # older timm: no such options
        gated=getattr(module, "gate", None) is not None, num_kv_heads=getattr(module, "num_kv_heads", None),
        **_drops(module),
    )
    new.q_norm, new.k_norm, new.norm = (copy.deepcopy(m) for m in (module.q_norm, module.k_norm, module.norm))
    return finish(new, module, module.state_dict())


def diff_attention_from_timm(module: Any) -> TimmDiffAttention:
    """timm's differential attention `timm.layers.diff_attention.DiffAttention` ->
    `attnzoo.compat.TimmDiffAttention` (timm's call and keys; its norms, `sub_norm` included, are copied,
    and its lambdas keep their dtype: timm makes them float32 in a half-precision module)."""
    qkv: nn.Linear = module.qkv
    _check_scale(module, module.head_dim)
    if qkv.out_features != 3 * qkv.in_features or module.proj.in_features != qkv.in_features:
        raise refuse(module, f"its qkv ({qkv.in_features} -> {qkv.out_features}) or proj is not timm's width")
    # timm's default (fused) path drops with `attn_drop_p`, its other path with the `attn_drop` module
    attn_drop = module.attn_drop_p if getattr(module, "fused_attn", True) else module.attn_drop.p
    new = TimmDiffAttention(
        qkv.in_features, module.num_heads, qkv_bias=qkv.bias is not None,
        proj_bias=module.proj.bias is not None, dual_lambda=bool(module.dual_lambda),
        attn_drop=float(attn_drop), proj_drop=float(module.proj_drop.p),
        device=qkv.weight.device, dtype=qkv.weight.dtype,  # not `factory`: the lambdas come first
    )
    new.lambda_init = float(module.lambda_init)
    new.fused_attn = bool(getattr(module, "fused_attn", True))  # which order timm draws its dropout masks in
    for name in ("q_norm", "k_norm", "norm", "sub_norm"):
        setattr(new, name, copy.deepcopy(getattr(module, name)))
    for name, param in module.named_parameters(recurse=False):  # their dtype too (timm's .to() moves them)
        if name.startswith("lambda_"):
            setattr(new, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
    return finish(new, module, module.state_dict())


def attention_pool2d_from_timm(module: Any) -> TimmAttentionPool2d:
    """The CLIP ResNets' head `timm.layers.attention_pool2d.AttentionPool2d` ->
    `attnzoo.compat.TimmAttentionPool2d` (timm's call, `reset` and keys)."""
    _check_scale(module, module.head_dim)
    separate = module.qkv is None
    first: nn.Linear = module.q if separate else module.qkv
    pre_logits = isinstance(module.proj, nn.Identity)
    new = TimmAttentionPool2d(
        module.in_features, module.feat_size, 0 if pre_logits else module.proj.out_features,
        embed_dim=module.embed_dim, num_heads=module.num_heads, qkv_bias=first.bias is not None,
        qkv_separate=separate, pool_type=module.pool_type, class_token=module.cls_token is not None,
        drop_rate=float(module.drop.p), **factory(module),
    )
    return finish(new, module, module.state_dict())


def mask_unit_attention_from_timm(module: Any) -> TimmMaskUnitAttention:
    """Hiera's `timm.models.hiera.MaskUnitAttention` -> `attnzoo.compat.TimmMaskUnitAttention` (timm's call
    and keys)."""
    _check_scale(module, int(module.head_dim))
    qkv: nn.Linear = module.qkv
    new = TimmMaskUnitAttention(qkv.in_features, int(module.dim_out), int(module.heads),
                                q_stride=int(module.q_stride), window_size=int(module.window_size),
                                use_mask_unit_attn=bool(module.use_mask_unit_attn), **factory(module))
    return finish(new, module, module.state_dict())


def sam2_attention_from_timm(module: Any) -> TimmSam2MultiScaleAttention:
    """SAM 2's Hiera `timm.models.hieradet_sam2.MultiScaleAttention` ->
    `attnzoo.compat.TimmSam2MultiScaleAttention` (timm's call and keys; its `q_pool` copied)."""
    qkv: nn.Linear = module.qkv
    _check_scale(module, int(module.dim_out) // int(module.num_heads))
    new = TimmSam2MultiScaleAttention(qkv.in_features, int(module.dim_out), int(module.num_heads),
                                      q_pool=copy.deepcopy(module.q_pool), **factory(module))
    return finish(new, module, module.state_dict())


def attention_pool_prr_from_timm(module: Any) -> TimmAttentionPoolPrr:
    """timm's `layers.attention_pool.AttentionPoolPrr` -> `attnzoo.compat.TimmAttentionPoolPrr` (timm's call
    and keys; its norms copied, whatever their class)."""
    _check_scale(module, int(module.head_dim))
    dim = int(module.out_features)
    new = TimmAttentionPoolPrr(dim, int(module.num_heads), pool_type=module.pool, **factory(module))
    new.pre_norm, new.post_norm = copy.deepcopy(module.pre_norm), copy.deepcopy(module.post_norm)
    return finish(new, module, module.state_dict())


def fastvit_attention_from_timm(module: Any) -> TimmFastVitAttention:
    """FastViT's `timm.models.fastvit.Attention` -> `attnzoo.compat.TimmFastVitAttention` (timm's call and
    keys)."""
    qkv: nn.Linear = module.qkv
    _check_scale(module, module.head_dim)
    if module.proj.bias is None:
        raise refuse(module, "its proj has no bias")
    new = TimmFastVitAttention(qkv.in_features, module.head_dim, qkv_bias=qkv.bias is not None,
                               **_drops(module))
    return finish(new, module, module.state_dict())


def cross_attention_from_timm(module: Any) -> TimmCrossAttention:
    """CrossViT's `timm.models.crossvit.CrossAttention` -> `attnzoo.compat.TimmCrossAttention` (timm's
    call and keys; timm's `scale` copied, which it lets a user set for older weights)."""
    wq: nn.Linear = module.wq
    if module.proj.bias is None:
        raise refuse(module, "its proj has no bias")
    new = TimmCrossAttention(wq.in_features, module.num_heads, qkv_bias=wq.bias is not None, **_drops(module))
    new.scale = float(module.scale)
    return finish(new, module, module.state_dict())


def attention_pool_latent_from_timm(module: Any) -> TimmAttentionPoolLatent:
    """timm's `layers.attention_pool.AttentionPoolLatent` -> `attnzoo.compat.TimmAttentionPoolLatent` (timm's
    call and keys; its q/k norms, norm and MLP are copied, whatever their classes)."""
    q_proj = isinstance(module.q, nn.Linear)
    _check_scale(module, module.head_dim)
    if module.pool not in ("token", "avg", ""):
        raise refuse(module, f"its pool_type {module.pool!r} is not 'token', 'avg' or ''")
    pre_logits = module.mlp is None
    new = TimmAttentionPoolLatent(
        module.kv.in_features, 0 if pre_logits else module.out_features, embed_dim=module.kv.in_features,
        num_heads=module.num_heads, feat_size=module.feat_size, qkv_bias=module.kv.bias is not None,
        q_proj=q_proj, latent_len=module.latent_len, latent_dim=module.latent_dim,
        pos_embed="abs" if module.pos_embed is not None else "", pool_type=module.pool,
        drop=float(module.proj_drop.p), **factory(module),
    )
    new.q_norm, new.k_norm = copy.deepcopy(module.q_norm), copy.deepcopy(module.k_norm)
    if not pre_logits:
        new.norm, new.mlp = copy.deepcopy(module.norm), copy.deepcopy(module.mlp)
    return finish(new, module, module.state_dict())


def metaformer_attention_from_timm(module: Any) -> TimmAttention:
    """MetaFormer's (CAFormer's) `timm.models.metaformer.Attention` -> `attnzoo.compat.TimmAttention`: the
    same computation and keys (`qkv`, `proj`), timm's `head_dim` / `num_heads` kept."""
    qkv: nn.Linear = module.qkv
    _check_scale(module, module.head_dim)
    new = TimmAttention(
        qkv.in_features, module.num_heads, attn_head_dim=module.head_dim, dim_out=module.proj.out_features,
        qkv_bias=qkv.bias is not None, proj_bias=module.proj.bias is not None,
        **_drops(module),
    )
    return finish(new, module, module.state_dict())


def _same_scale(module: Any, new: Any) -> Any:
    """`new` with `module`'s weights, or refused where timm's `scale` is not `new.head_dim ** -0.5`."""
    _check_scale(module, new.head_dim)
    return finish(new, module, module.state_dict())


def nest_attention_from_timm(module: Any) -> TimmNestAttention:
    """NesT's `timm.models.nest.Attention` -> `attnzoo.compat.TimmNestAttention` (timm's call and keys)."""
    qkv = module.qkv
    new = TimmNestAttention(qkv.in_features, module.num_heads, qkv_bias=qkv.bias is not None,
                            **_drops(module))
    return _same_scale(module, new)


def visformer_attention_from_timm(module: Any) -> TimmVisformerAttention:
    """Visformer's `timm.models.visformer.Attention` -> `attnzoo.compat.TimmVisformerAttention`."""
    ratio = module.head_dim / (module.dim // module.num_heads)
    new = TimmVisformerAttention(module.dim, module.num_heads, head_dim_ratio=ratio, **_drops(module))
    if new.head_dim != module.head_dim:
        raise refuse(module, f"its head_dim {module.head_dim} is no round(dim // num_heads * ratio)")
    return _same_scale(module, new)


def tnt_attention_from_timm(module: Any) -> TimmTntAttention:
    """TNT's `timm.models.tnt.Attention` -> `attnzoo.compat.TimmTntAttention` (timm's call and keys)."""
    qk = module.qk
    new = TimmTntAttention(qk.in_features, module.hidden_dim, module.num_heads, qkv_bias=qk.bias is not None,
                           **_drops(module))
    return _same_scale(module, new)


def gcvit_attention_from_timm(module: Any) -> TimmGcVitWindowAttention:
    """GC ViT's `timm.models.gcvit.WindowAttentionGlobal` -> `attnzoo.compat.TimmGcVitWindowAttention`
    (timm's call and keys)."""
    rel = module.rel_pos
    if getattr(rel, "prefix_tokens", 0) or tuple(rel.window_size) != tuple(module.window_size):
        raise refuse(module, "its relative position bias has prefix tokens or another window size")
    qkv: nn.Linear = module.qkv
    new = TimmGcVitWindowAttention(
        qkv.in_features, module.num_heads, tuple(module.window_size), use_global=bool(module.use_global),
        qkv_bias=qkv.bias is not None, **_drops(module),
    )
    return _same_scale(module, new)


def factor_attention_from_timm(module: Any) -> TimmFactorAttention:
    """CoaT's `timm.models.coat.FactorAttnConvRelPosEnc` -> `attnzoo.compat.TimmFactorAttention`, its
    shared position encoding kept (the same module: the stage's blocks share it)."""
    qkv: nn.Linear = module.qkv
    _cait_scale(module, qkv.in_features)  # the same rule: scale (dim // num_heads) ** -0.5
    new = TimmFactorAttention(qkv.in_features, module.num_heads, qkv_bias=qkv.bias is not None,
                              **_drops(module))
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("crpe.")}
    new.load_state_dict(state, strict=True)
    new.crpe = module.crpe  # shared, not copied
    return new.train(module.training)


CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.layers.attention.Attention": attention_from_timm,
    "timm.models.beit.Attention": beit_attention_from_timm,
    "timm.models.volo.Attention": volo_attention_from_timm,
    "timm.models.volo.ClassAttention": class_attention_from_timm,
    "timm.models.cait.TalkingHeadAttn": talking_head_from_timm,
    "timm.models.cait.ClassAttn": cait_class_attention_from_timm,
    "timm.models.eva.EvaAttention": eva_attention_from_timm,
    "timm.layers.attention.AttentionRope": rope_attention_from_timm,
    "timm.layers.diff_attention.DiffAttention": diff_attention_from_timm,
    "timm.models.fastvit.Attention": fastvit_attention_from_timm,
    "timm.models.hiera.MaskUnitAttention": mask_unit_attention_from_timm,
    "timm.models.hieradet_sam2.MultiScaleAttention": sam2_attention_from_timm,
    "timm.models.crossvit.CrossAttention": cross_attention_from_timm,
    "timm.layers.attention_pool.AttentionPoolLatent": attention_pool_latent_from_timm,
    "timm.layers.attention_pool2d.AttentionPool2d": attention_pool2d_from_timm,
    "timm.layers.attention_pool.AttentionPoolPrr": attention_pool_prr_from_timm,
    "timm.models.metaformer.Attention": metaformer_attention_from_timm,
    "timm.models.nest.Attention": nest_attention_from_timm,
    "timm.models.visformer.Attention": visformer_attention_from_timm,
    "timm.models.tnt.Attention": tnt_attention_from_timm,
    "timm.models.gcvit.WindowAttentionGlobal": gcvit_attention_from_timm,
    "timm.models.coat.FactorAttnConvRelPosEnc": factor_attention_from_timm,
}
