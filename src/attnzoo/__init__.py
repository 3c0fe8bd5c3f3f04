"""attnzoo: attention mechanisms for PyTorch.

Canonical classes come from `attnzoo`; classes with the seed documents' names and constructor
arguments come from `attnzoo.compat`. Build any mechanism by name with `create`.

Importing a family module registers its mechanisms (one family per file), so importing the package
fills the registry.
"""

from attnzoo import compat, convert  # noqa: E402 (compat re-exports the families' seed classes)
from attnzoo._registry import Example, Spec, create, get_spec, list_modules
from attnzoo.blocks import CrossAttentionBlock, FeedForwardBlock, KerasMultiHeadAttention, SelfAttentionBlock
from attnzoo.functional import attend, fused_attn, fused_enabled
from attnzoo.kernels.blocked import global_kernel
from attnzoo.maps import AttentionMap, capture_maps
from attnzoo.mechanisms.acmix import ACmix
from attnzoo.mechanisms.aft import AFTFull
from attnzoo.mechanisms.axial import AxialAttention
from attnzoo.mechanisms.bam import BottleneckAttentionModule
from attnzoo.mechanisms.bat import BATNonLocalAttention
from attnzoo.mechanisms.biformer import BiLevelRoutingAttention
from attnzoo.mechanisms.biformer_nchw import BiLevelRoutingAttention2d, nchwBRA
from attnzoo.mechanisms.bottleneck import BottleneckAttention
from attnzoo.mechanisms.cbam import CBAM, ChannelAttention, SpatialAttention
from attnzoo.mechanisms.cbam_res import ResidualCBAM
from attnzoo.mechanisms.cbam_seed import CBAtten_Res
from attnzoo.mechanisms.coord import (
    CoordAttention,
    EfficientLocalAttention,
    SimpleCoordAttention,
    StripAttention,
)
from attnzoo.mechanisms.cot import ContextualTransformer, FightingcvCoTAttention
from attnzoo.mechanisms.criss_cross import CrissCrossAttention
from attnzoo.mechanisms.crossformer import CrossFormerAttention, CrossFormerGroupAttention
from attnzoo.mechanisms.danet import DANetChannelAttention, DANetPositionAttention, DualAttention
from attnzoo.mechanisms.danet_fightingcv import (
    FightingcvChannelAttentionModule,
    FightingcvDAModule,
    FightingcvPositionAttentionModule,
)
from attnzoo.mechanisms.deformable import DeformableAttention
from attnzoo.mechanisms.double_attention import DoubleAttention
from attnzoo.mechanisms.dual_gated import DualGatedAttention
from attnzoo.mechanisms.eca import (
    CircularEfficientChannelAttention,
    EfficientChannelAttention,
    EfficientChannelAttentionMlp,
)
from attnzoo.mechanisms.emsa import EMSA
from attnzoo.mechanisms.ese import EffectiveSqueezeExcite
from attnzoo.mechanisms.external import ExternalAttention
from attnzoo.mechanisms.gather_excite import GatherExcite
from attnzoo.mechanisms.gfnet import GlobalFilter
from attnzoo.mechanisms.global_context import GlobalContext, GlobalContextAdd
from attnzoo.mechanisms.halo import HaloAttention
from attnzoo.mechanisms.lambda_layer import LambdaLayer
from attnzoo.mechanisms.light_cbam import LightCBAM
from attnzoo.mechanisms.linear import LinearAttention
from attnzoo.mechanisms.mha import MultiHeadAttention
from attnzoo.mechanisms.moa import OverlappedAttention
from attnzoo.mechanisms.mobilevit import MobileViTBlock
from attnzoo.mechanisms.mobilevit_v2 import SeparableSelfAttention
from attnzoo.mechanisms.muse import MUSEAttention
from attnzoo.mechanisms.neighborhood import (
    NeighborhoodAttention1d,
    NeighborhoodAttention2d,
    NeighborhoodAttention3d,
)
from attnzoo.mechanisms.non_local import NonLocalBlock
from attnzoo.mechanisms.outlook import OutlookAttention
from attnzoo.mechanisms.parnet import ParNetAttention
from attnzoo.mechanisms.polarized import ParallelPolarizedSelfAttention, SequentialPolarizedSelfAttention
from attnzoo.mechanisms.psa import PyramidSplitAttention
from attnzoo.mechanisms.residual_attention import ResidualAttention
from attnzoo.mechanisms.s2 import S2Attention
from attnzoo.mechanisms.sagan import ChannelSelfAttention, SpatialSelfAttention
from attnzoo.mechanisms.se import SqueezeExcite
from attnzoo.mechanisms.seq2seq import (
    AdditiveAttention,
    ConcatAttention,
    DotProductAttention,
    GeneralAttention,
)
from attnzoo.mechanisms.seq2seq_location import LocationAttention
from attnzoo.mechanisms.sge import SpatialGroupEnhance
from attnzoo.mechanisms.shuffle import ShuffleAttention
from attnzoo.mechanisms.simam import SimAM
from attnzoo.mechanisms.sk import SKConv
from attnzoo.mechanisms.splat import SplitAttention
from attnzoo.mechanisms.swin import (
    ShiftedWindowAttention,
    WindowAttention,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from attnzoo.mechanisms.swin_v2 import ShiftedWindowAttentionV2
from attnzoo.mechanisms.temporal import TemporalAttention
from attnzoo.mechanisms.triplet import TripletAttention
from attnzoo.mechanisms.ufo import UFOAttention
from attnzoo.mechanisms.vip import WeightedPermuteMLP
from attnzoo.surgery import find, insert, replace

__version__ = "0.1.0"

__all__ = [
    # seed and official names, converters
    "compat",
    "convert",
    # registry
    "Example",
    "Spec",
    "create",
    "get_spec",
    "list_modules",
    # attention core
    "attend",
    "fused_attn",
    "fused_enabled",
    "global_kernel",
    # surgery and maps
    "AttentionMap",
    "capture_maps",
    "find",
    "insert",
    "replace",
    # gating: SE, CBAM, SK, dual gated
    "CBAM",
    "CBAtten_Res",
    "ChannelAttention",
    "DualGatedAttention",
    "ResidualCBAM",
    "SKConv",
    "SpatialAttention",
    "SqueezeExcite",
    # breadth-a: timm's gates (eca, ceca, ecam, ese, gc, gca, ge, lcbam)
    "CircularEfficientChannelAttention",
    "EfficientChannelAttention",
    "EfficientChannelAttentionMlp",
    "EffectiveSqueezeExcite",
    "GatherExcite",
    "GlobalContext",
    "GlobalContextAdd",
    "LightCBAM",
    # global self-attention: SAGAN spatial and channel, non-local
    "ChannelSelfAttention",
    "NonLocalBlock",
    "SpatialSelfAttention",
    # transformer: multi-head, Swin windows, temporal
    "MultiHeadAttention",
    "ShiftedWindowAttention",
    "ShiftedWindowAttentionV2",
    "TemporalAttention",
    "WindowAttention",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
    # prefix-named transformer blocks
    "CrossAttentionBlock",
    "FeedForwardBlock",
    "KerasMultiHeadAttention",
    "SelfAttentionBlock",
    # BiFormer and ACmix
    "ACmix",
    "BiLevelRoutingAttention",
    "BiLevelRoutingAttention2d",
    "nchwBRA",
    # seq2seq scoring rules
    "AdditiveAttention",
    "ConcatAttention",
    "DotProductAttention",
    "GeneralAttention",
    "LocationAttention",
    # breadth-b: strip-pooling gates (coord, scoord, ela, strip), split attention, BAT
    "BATNonLocalAttention",
    "CoordAttention",
    "EfficientLocalAttention",
    "SimpleCoordAttention",
    "SplitAttention",
    "StripAttention",
    # neighbourhood (NAT/DiNAT) and linear attention
    "LinearAttention",
    "NeighborhoodAttention1d",
    "NeighborhoodAttention2d",
    "NeighborhoodAttention3d",
    # fightingcv gates: BAM, SGE, shuffle, SimAM, triplet, ParNet, residual attention
    "BottleneckAttentionModule",
    "ParNetAttention",
    "ResidualAttention",
    "ShuffleAttention",
    "SimAM",
    "SpatialGroupEnhance",
    "TripletAttention",
    # timm-token: timm's token-mixing attentions (lambda, bottleneck, halo)
    "BottleneckAttention",
    "HaloAttention",
    "LambdaLayer",
    # fcv-token-a: fightingcv token mixers (external, emsa, muse, aft_full, ufo)
    "AFTFull",
    "EMSA",
    "ExternalAttention",
    "MUSEAttention",
    "UFOAttention",
    # fightingcv gates b
    "PyramidSplitAttention",
    "ParallelPolarizedSelfAttention",
    "SequentialPolarizedSelfAttention",
    "DoubleAttention",
    "S2Attention",
    "ContextualTransformer",
    "FightingcvCoTAttention",
    "DANetPositionAttention",
    "DANetChannelAttention",
    "DualAttention",
    "FightingcvPositionAttentionModule",
    "FightingcvChannelAttentionModule",
    "FightingcvDAModule",
    # fcv-token-b: fightingcv spatial token mixers (criss-cross, axial, outlook, ...)
    "AxialAttention",
    "CrissCrossAttention",
    "GlobalFilter",
    "MobileViTBlock",
    "OutlookAttention",
    "SeparableSelfAttention",
    "WeightedPermuteMLP",
    # moa: multi-resolution overlapped attention
    "OverlappedAttention",
    # crossformer: long/short distance attention with the dynamic position bias
    "CrossFormerAttention",
    "CrossFormerGroupAttention",
    # fcv-deformable: DAT's deformable attention
    "DeformableAttention",
]
