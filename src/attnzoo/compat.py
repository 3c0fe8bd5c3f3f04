"""Seed-compatible classes: the seed documents' class names, constructor arguments and state_dict keys.

Code and checkpoints written against the seeds (and the papers' official code) load here unchanged
(`load_state_dict(..., strict=True)`) and give the seed's numbers; each class's docstring lists what
differs from the seed and why.

Two names are shared with canonical classes and mean the seed's version here: ``MultiHeadAttention``
(the seed's module; ``create("MultiHeadAttention")`` still builds the canonical one) and
``BiLevelRoutingAttention`` (the official BiFormer module's ``forward(x, ret_attn_mask=False)``,
which can also return the routing and attention weights as the official tuple). ``ACmix`` is the
official ``ACmix(in_planes, out_planes, kernel_att, head, ...)`` (the canonical ``attnzoo.ACmix``
takes ``channels, out_channels, kernel_att, num_heads, ...``), and ``nchwBRA`` the official NCHW
BiFormer module (canonical: ``attnzoo.BiLevelRoutingAttention2d``). ``WindowAttention`` is the
official Swin module (no defaults, a persistent ``relative_position_index``); the canonical
``attnzoo.WindowAttention`` keeps the index non-persistent, as timm does, and loads official,
torchvision and timm state_dicts alike.
``MultiheadAttention`` (lower-case h) is torch's ``nn.MultiheadAttention``: its constructor, forward and
state_dict, run by ``attnzoo.functional.attend`` (``attnzoo.convert.from_torch`` converts torch's module).
``ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2`` are torchvision's Swin modules (its
constructor, forward, state_dict and numbers; ``attnzoo.convert.from_torchvision`` converts them);
the canonical ``attnzoo.ShiftedWindowAttention`` and ``attnzoo.ShiftedWindowAttentionV2`` (registered
``shifted_window``, ``swin_v2_window``) mask padded tokens instead of letting them take part.
``TimmWindowAttentionV2`` is timm's Swin V2 ``WindowAttention`` (called on windows with timm's float
mask; ``attnzoo.convert.from_timm`` converts timm's module), ``TimmAttention`` timm's ViT
``Attention``, ``TimmBeitAttention`` timm's BEiT ``Attention`` (relative position bias, q/v biases),
``TimmVoloAttention`` and ``TimmClassAttention`` VOLO's ``Attention`` (on maps) and ``ClassAttention``,
``TimmTalkingHeadAttention`` and ``TimmCaitClassAttention`` CaiT's ``TalkingHeadAttn`` and ``ClassAttn``,
``TimmEvaAttention`` EVA's ``EvaAttention`` (rotary embedding, q/v biases, scale norm),
``TimmRopeAttention`` timm's ``AttentionRope`` (Qwen3-ViT, DeepSeek ViT: rotary, grouped-query heads),
``TimmDiffAttention`` timm's ``DiffAttention`` (differential attention, ViT's ``attn_layer='diff'``),
``TimmFastVitAttention`` and ``TimmCrossAttention`` FastViT's ``Attention`` (on maps) and CrossViT's
``CrossAttention`` (the class token over its sequence), ``TimmAttentionPoolLatent`` the SigLIP ViTs'
``AttentionPoolLatent`` (latent queries pooling the tokens), ``TimmAttentionPool2d`` the CLIP ResNets'
``AttentionPool2d`` (a map pooled by attention), ``TimmAttentionPoolPrr`` the PRR pool (projection-free
attention before pooling), ``TimmNestAttention``,
``TimmVisformerAttention`` and ``TimmTntAttention`` NesT's, Visformer's and TNT's ``Attention``,
``TimmGcVitWindowAttention`` GC ViT's ``WindowAttentionGlobal`` (local or global-query windows),
``TimmGPSA`` ConViT's ``GPSA`` (content attention gated with a learnt local positional one),
``TimmMaskUnitAttention`` Hiera's ``MaskUnitAttention`` (mask-unit or global, max-pooled queries),
``TimmSam2MultiScaleAttention`` SAM 2's Hiera ``MultiScaleAttention`` (channels-last, pooled queries),
``TimmWindowMultiHeadAttention`` Swin V2 CR's ``WindowMultiHeadAttention`` (meta-network position bias),
``TimmLinearSelfAttention`` MobileViT v2's ``LinearSelfAttention`` (separable attention on patches),
``TimmLiteMLA`` MIT EfficientViT's ``LiteMLA`` (multi-scale ReLU linear attention),
``TimmEfficientAdditiveAttention`` SwiftFormer's ``EfficientAdditiveAttention`` (one global query),
``TimmCascadedGroupAttention`` Microsoft EfficientViT's ``CascadedGroupAttention`` (heads on channel
splits, each fed the previous head's output),
``TimmFactorAttention`` CoaT's ``FactorAttnConvRelPosEnc`` (factorized attention, shared position encoding),
``TimmPvtV2Attention`` PVT v2's ``Attention`` (spatial reduction or the linear mode),
``TimmNextVitAttention`` Next-ViT's ``EfficientAttention`` (keys and values from pooled tokens),
``TimmMultiScaleAttention`` MViT v2's ``MultiScaleAttention`` (pooled heads, decomposed position logits),
``TimmTwinsGlobalAttention`` and ``TimmTwinsLocalAttention`` Twins' ``GlobalSubSampleAttn`` and
``LocallyGroupedAttn`` (all called with the map's size, as timm's), ``TimmXCA`` and
``TimmCrossCovarianceAttention`` XCiT's ``XCA`` and EdgeNeXt's ``CrossCovarianceAttn`` (cross-covariance
attention over the channels of each head),
``TimmRelPosAttention`` the relative-position ViT's ``RelPosAttention`` (timm's ``rel_pos`` module kept) and
``TimmSamAttention`` SAM's ``Attention`` (decomposed relative positions or a rotary embedding, on maps),
``TimmLevitAttention`` and
``TimmLevitAttentionDownsample`` LeViT's ``Attention`` and ``AttentionDownsample`` (learned offset bias,
BatchNorm projections, linear or conv mode), ``TimmTinyVitAttention`` TinyViT's ``Attention`` and
``TimmEfficientFormerAttention`` EfficientFormer's ``Attention`` (the same offset bias),
``TimmEfficientFormerV2Attention`` and ``TimmEfficientFormerV2AttentionDownsample`` EfficientFormer V2's
``Attention2d`` (talking heads, a local value branch) and ``Attention2dDownsample``,
``TimmMultiQueryAttention2d`` and ``TimmAttention2d`` MobileNetV4's ``MultiQueryAttention2d`` (query heads
sharing one key and value head, pooled queries, strided keys) and ``Attention2d``,
``TimmMaxxvitAttention2d`` and ``TimmMaxxvitAttentionCl`` MaxViT / CoAtNet's ``Attention2d`` and
``AttentionCl`` (NCHW and channels-last, timm's ``rel_pos`` module kept), and
``TimmDavitWindowAttention``, ``TimmDavitChannelAttention`` and ``TimmDavitChannelAttentionV2`` DaViT's
``WindowAttention``, ``ChannelAttention`` and ``ChannelAttentionV2`` (attention within windows, and among
each head's channels).
"""

from torch import nn

from attnzoo._checks import checked
from attnzoo.blocks.transformer import cross_attention, feed_forward, self_attention
from attnzoo.mechanisms.acmix import OfficialACmix as ACmix
from attnzoo.mechanisms.biformer import LegacyBiLevelRoutingAttention as BiLevelRoutingAttention
from attnzoo.mechanisms.biformer_nchw import nchwBRA
from attnzoo.mechanisms.cbam_seed import CBAtten_Res, ChannelAttention, SpatialAttention
from attnzoo.mechanisms.dual_gated import SeedDualAttention
from attnzoo.mechanisms.mha import SeedMultiHeadAttention as MultiHeadAttention
from attnzoo.mechanisms.non_local import NonLocalBlockND
from attnzoo.mechanisms.sagan import Self_Attn_Channel, Self_Attn_Spatial
from attnzoo.mechanisms.se import SELayer
from attnzoo.mechanisms.seq2seq_location import Attn
from attnzoo.mechanisms.sk import SKEConv
from attnzoo.mechanisms.swin_official import OfficialWindowAttention as WindowAttention
from attnzoo.mechanisms.swin_torchvision import TorchvisionShiftedWindowAttention as ShiftedWindowAttention
from attnzoo.mechanisms.swin_torchvision import (
    TorchvisionShiftedWindowAttentionV2 as ShiftedWindowAttentionV2,
)
from attnzoo.mechanisms.swin_v2_timm import TimmWindowAttentionV2
from attnzoo.mechanisms.temporal import Attention
from attnzoo.mechanisms.timm_attention import TimmAttention
from attnzoo.mechanisms.timm_beit import TimmBeitAttention
from attnzoo.mechanisms.timm_cait import TimmCaitClassAttention, TimmTalkingHeadAttention
from attnzoo.mechanisms.timm_cascaded import TimmCascadedGroupAttention
from attnzoo.mechanisms.timm_coat import TimmFactorAttention
from attnzoo.mechanisms.timm_convit import TimmGPSA
from attnzoo.mechanisms.timm_davit import (
    TimmDavitChannelAttention,
    TimmDavitChannelAttentionV2,
    TimmDavitWindowAttention,
)
from attnzoo.mechanisms.timm_diff import TimmDiffAttention
from attnzoo.mechanisms.timm_efficientformer_v2 import (
    TimmEfficientFormerV2Attention,
    TimmEfficientFormerV2AttentionDownsample,
)
from attnzoo.mechanisms.timm_eva import TimmEvaAttention, TimmRopeAttention
from attnzoo.mechanisms.timm_gcvit import TimmGcVitWindowAttention
from attnzoo.mechanisms.timm_hiera import TimmMaskUnitAttention
from attnzoo.mechanisms.timm_hieradet import TimmSam2MultiScaleAttention
from attnzoo.mechanisms.timm_levit import TimmLevitAttention, TimmLevitAttentionDownsample
from attnzoo.mechanisms.timm_levit_family import TimmEfficientFormerAttention, TimmTinyVitAttention
from attnzoo.mechanisms.timm_litemla import TimmLiteMLA
from attnzoo.mechanisms.timm_maxvit import TimmMaxxvitAttention2d, TimmMaxxvitAttentionCl
from attnzoo.mechanisms.timm_mobilevit import TimmLinearSelfAttention
from attnzoo.mechanisms.timm_mqa import TimmAttention2d, TimmMultiQueryAttention2d
from attnzoo.mechanisms.timm_mvit import TimmMultiScaleAttention
from attnzoo.mechanisms.timm_nextvit import TimmNextVitAttention
from attnzoo.mechanisms.timm_pool2d import TimmAttentionPool2d
from attnzoo.mechanisms.timm_prr import TimmAttentionPoolPrr
from attnzoo.mechanisms.timm_pvt import TimmPvtV2Attention, TimmTwinsGlobalAttention, TimmTwinsLocalAttention
from attnzoo.mechanisms.timm_relpos_vit import TimmRelPosAttention, TimmSamAttention
from attnzoo.mechanisms.timm_swiftformer import TimmEfficientAdditiveAttention
from attnzoo.mechanisms.timm_swin_cr import TimmWindowMultiHeadAttention
from attnzoo.mechanisms.timm_vit_variants import (
    TimmAttentionPoolLatent,
    TimmCrossAttention,
    TimmFastVitAttention,
)
from attnzoo.mechanisms.timm_vit_variants_b import TimmNestAttention, TimmTntAttention, TimmVisformerAttention
from attnzoo.mechanisms.timm_volo import TimmClassAttention, TimmVoloAttention
from attnzoo.mechanisms.timm_xca import TimmCrossCovarianceAttention, TimmXCA
from attnzoo.mechanisms.torch_mha import MultiheadAttention

# Every seed and official class gets the shared option and input checks, as the canonical ones do.
for _obj in list(globals().values()):
    if isinstance(_obj, type) and issubclass(_obj, nn.Module) and _obj.__module__.startswith("attnzoo"):
        checked(_obj)

__all__ = [
    # gating
    "CBAtten_Res",
    "ChannelAttention",
    "SELayer",
    "SKEConv",
    "SeedDualAttention",
    "SpatialAttention",
    # global self-attention
    "NonLocalBlockND",
    "Self_Attn_Channel",
    "Self_Attn_Spatial",
    # transformer
    "Attention",
    "MultiHeadAttention",
    "MultiheadAttention",
    "ShiftedWindowAttention",
    "ShiftedWindowAttentionV2",
    "TimmAttention",
    "TimmBeitAttention",
    "TimmCaitClassAttention",
    "TimmClassAttention",
    "TimmCrossCovarianceAttention",
    "TimmDavitChannelAttention",
    "TimmDavitChannelAttentionV2",
    "TimmDavitWindowAttention",
    "TimmEfficientFormerAttention",
    "TimmEfficientFormerV2Attention",
    "TimmEfficientFormerV2AttentionDownsample",
    "TimmEvaAttention",
    "TimmRopeAttention",
    "TimmDiffAttention",
    "TimmFastVitAttention",
    "TimmCrossAttention",
    "TimmAttentionPoolLatent",
    "TimmAttentionPool2d",
    "TimmAttentionPoolPrr",
    "TimmNestAttention",
    "TimmVisformerAttention",
    "TimmTntAttention",
    "TimmGcVitWindowAttention",
    "TimmGPSA",
    "TimmMaskUnitAttention",
    "TimmSam2MultiScaleAttention",
    "TimmFactorAttention",
    "TimmLevitAttention",
    "TimmLevitAttentionDownsample",
    "TimmLinearSelfAttention",
    "TimmEfficientAdditiveAttention",
    "TimmLiteMLA",
    "TimmCascadedGroupAttention",
    "TimmMaxxvitAttention2d",
    "TimmMaxxvitAttentionCl",
    "TimmMultiQueryAttention2d",
    "TimmAttention2d",
    "TimmPvtV2Attention",
    "TimmNextVitAttention",
    "TimmMultiScaleAttention",
    "TimmRelPosAttention",
    "TimmSamAttention",
    "TimmTalkingHeadAttention",
    "TimmTinyVitAttention",
    "TimmTwinsGlobalAttention",
    "TimmTwinsLocalAttention",
    "TimmVoloAttention",
    "TimmWindowAttentionV2",
    "TimmWindowMultiHeadAttention",
    "TimmXCA",
    "WindowAttention",
    # prefix-named blocks (builders returning PyTorch modules)
    "cross_attention",
    "feed_forward",
    "self_attention",
    # BiFormer and ACmix
    "ACmix",
    "BiLevelRoutingAttention",
    "nchwBRA",
    # seq2seq
    "Attn",
]

# Users know these classes by the names they import from here: their messages and reprs say that name
# (`type(self).__name__`). `__qualname__`, which pickle and the docs' paths use, stays the defining
# module's (`OfficialWindowAttention` in `attnzoo.mechanisms.swin_official`, ...).
for _public in __all__:
    _obj = globals()[_public]
    if isinstance(_obj, type) and _obj.__name__ != _public:
        _obj.__name__ = _public
