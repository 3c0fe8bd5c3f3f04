"""timm -> attnzoo for the existing mechanisms: timm's `SEModule`, `CbamModule`, `SelectiveKernel`,
Swin `WindowAttention` and `NonLocalAttn` -> `SqueezeExcite`, `CBAM`, `SKConv`, `WindowAttention`,
`NonLocalBlock`.

`EXISTING_CONVERTERS` maps timm's dotted class names to the converters; `attnzoo.convert.timm` adds
them to `TIMM_CONVERTERS`, so `from_timm`, `attnzoo.convert.convert` and `attnzoo.replace` reach them.
timm is never imported here: the converters read the module they are given. Each result holds a
copy of the module's weights and buffers (same device, dtype and training flag); a module the
canonical class cannot represent raises `TypeError` naming the class and the reason. The options
each converter sets and the known differences are listed in docs/interop.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import Tensor, nn

from attnzoo.convert._timm_common import TimmKeys, copy_activation, factory, refuse, rename, same_norm
from attnzoo.mechanisms.cbam import CBAM
from attnzoo.mechanisms.non_local import NonLocalBlock
from attnzoo.mechanisms.se import SqueezeExcite
from attnzoo.mechanisms.sk import SKConv
from attnzoo.mechanisms.swin import WindowAttention
from attnzoo.mechanisms.swin_v2_timm import TimmWindowAttentionV2
from attnzoo.mechanisms.timm_swin_cr import TimmWindowMultiHeadAttention

__all__ = ["EXISTING_CONVERTERS"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


# ---------------------------------------------------------------------------------------------
# Shared helpers


def finish(new: ModuleT, module: nn.Module, state: Mapping[str, Tensor]) -> ModuleT:
    """Load `state` into `new` strictly (a copy) and give it the module's training flag."""
    new.load_state_dict(state, strict=True)
    new.train(module.training)
    return new


def plain_batchnorm(module: nn.Module, bn: nn.Module, act: type[nn.Module] | None = None) -> None:
    """Refuse unless `bn` is a 2-D BatchNorm (timm's `BatchNormAct2d` included) whose activation is
    `act` (None: no activation) and which has no dropout."""
    if not isinstance(bn, nn.BatchNorm2d):
        raise refuse(module, f"its norm layer is a {type(bn).__qualname__}, not a BatchNorm2d")
    bn_act, drop = getattr(bn, "act", nn.Identity()), getattr(bn, "drop", nn.Identity())
    if type(drop) is not nn.Identity:
        raise refuse(module, f"its norm layer has a {type(drop).__qualname__} (only no dropout converts)")
    wanted = nn.Identity if act is None else act
    if type(bn_act) is not wanted:
        got = type(bn_act).__qualname__
        raise refuse(module, f"its norm layer's activation is a {got}, not {wanted.__name__}")


def has_aa(conv_norm_act: nn.Module) -> bool:
    """Whether a timm `ConvNormAct` has an anti-aliasing layer (None or Identity when it has none)."""
    aa = getattr(conv_norm_act, "aa", None)
    return aa is not None and type(aa) is not nn.Identity


# ---------------------------------------------------------------------------------------------
# The converters


def se_from_timm(module: Any) -> SqueezeExcite:
    """timm's `SEModule` (create_attn "se") -> `SqueezeExcite`: same keys, activations copied."""
    fc1: nn.Conv2d = module.fc1
    new = SqueezeExcite(
        fc1.in_channels,
        rd_channels=fc1.out_channels,
        add_maxpool=bool(module.add_maxpool),
        bias=fc1.bias is not None,
        **factory(module),
    )
    new.bn, new.act = copy.deepcopy(module.bn), copy.deepcopy(module.act)
    new.gate = copy_activation(module.gate, "gate", module)  # nn.Hardsigmoid -> HardSigmoid (double backward)
    return finish(new, module, module.state_dict())


def cbam_from_timm(module: Any) -> CBAM:
    """timm's `CbamModule` (create_attn "cbam") -> `CBAM` with the spatial BatchNorm."""
    channel, spatial = module.channel, module.spatial
    if type(channel).__name__ != "ChannelAttn" or type(spatial).__name__ != "SpatialAttn":
        raise refuse(module, f"its parts are {type(channel).__name__}/{type(spatial).__name__}, "
                             "not ChannelAttn/SpatialAttn")
    conv, bn = spatial.conv.conv, spatial.conv.bn
    plain_batchnorm(module, bn)
    if has_aa(spatial.conv):
        raise refuse(module, "its spatial convolution has anti-aliasing")
    fc1: nn.Conv2d = channel.fc1
    new = CBAM(
        fc1.in_channels,
        kernel_size=conv.kernel_size[0],
        rd_channels=fc1.out_channels,
        bias=fc1.bias is not None,
        norm_layer=nn.BatchNorm2d,
        spatial_bias=conv.bias is not None,
        **factory(module),
    )
    if conv.padding != (conv.kernel_size[0] // 2,) * 2 or conv.stride != (1, 1) or conv.dilation != (1, 1):
        raise refuse(module, "its spatial convolution is not a stride-1, same-padded, undilated one")
    new.ca.sharedMLP[1] = copy.deepcopy(channel.act)
    # nn.Hardsigmoid -> HardSigmoid (double backward); weighted gates (PReLU) keep their weights
    new.ca.gate = copy_activation(channel.gate, "channel gate", module)
    new.sa.gate = copy_activation(spatial.gate, "spatial gate", module)
    same_norm(new.sa.bn, bn)
    new.register_load_state_dict_pre_hook(TimmKeys(cbam_keys, ("channel.", "spatial.")))
    return finish(new, module, cbam_keys(module.state_dict()))


# Every timm part the converter copies, so an activation or gate with weights (`gate_layer="prelu"`)
# keeps them under CBAM's names.
_CBAM_NAMES = {"channel.fc1.": "ca.sharedMLP.0.", "channel.act.": "ca.sharedMLP.1.",
               "channel.fc2.": "ca.sharedMLP.2.", "channel.gate.": "ca.gate.",
               "spatial.conv.conv.": "sa.conv.", "spatial.conv.bn.": "sa.bn.", "spatial.gate.": "sa.gate."}


def cbam_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm's `CbamModule` keys -> `CBAM`'s."""
    return rename(state, _CBAM_NAMES)


def sk_from_timm(module: Any) -> SKConv:
    """timm's `SelectiveKernel` (create_attn "sk") -> `SKConv` with `bias=False`,
    `fuse_norm_act=True`, timm's kernels/dilations, `split_input` and widths."""
    convs, attn = [p.conv for p in module.paths], module.attn
    for path in module.paths:
        plain_batchnorm(module, path.bn, nn.ReLU)
        if has_aa(path):
            raise refuse(module, "a path has anti-aliasing (aa_layer)")
    plain_batchnorm(module, attn.bn)
    if type(attn.act) is not nn.ReLU:
        raise refuse(module, f"its attention activation is a {type(attn.act).__qualname__}, not ReLU")
    stride, groups = convs[0].stride, convs[0].groups
    if any(c.stride != stride or c.groups != groups or c.bias is not None for c in convs):
        raise refuse(module, "its paths differ in stride or groups, or have biases")
    if all(c.kernel_size == (3, 3) for c in convs) and all(c.dilation[0] == c.dilation[1] for c in convs):
        keep_3x3, dilation, sizes = True, 1, [2 * c.dilation[0] + 1 for c in convs]
    elif len({c.dilation for c in convs}) == 1 and convs[0].dilation[0] == convs[0].dilation[1]:
        keep_3x3, dilation, sizes = False, convs[0].dilation[0], [c.kernel_size[0] for c in convs]
    else:
        raise refuse(module, "its paths mix kernel sizes and dilations in a way SKConv cannot express")
    new = SKConv(
        module.in_channels,
        len(convs),
        groups=groups,
        stride=stride[0],
        rd_channels=attn.fc_reduce.out_channels,
        kernel_sizes=sizes,
        dilation=dilation,
        keep_3x3=keep_3x3,
        out_channels=module.out_channels,
        split_input=bool(module.split_input),
        bias=False,
        fuse_norm_act=True,
        **factory(module),
    )
    for i, (theirs, path) in enumerate(zip(convs, module.paths, strict=True)):
        ours = new.get_submodule(f"convs.{i}.0")
        if ours.padding != theirs.padding or ours.kernel_size != theirs.kernel_size:
            raise refuse(module, f"a path's convolution ({theirs}) is not SKConv's ({ours})")
        same_norm(new.get_submodule(f"convs.{i}.1"), path.bn)
    same_norm(new.get_submodule("fuse.0"), attn.bn)
    new.register_load_state_dict_pre_hook(TimmKeys(sk_keys, ("paths.", "attn.")))
    return finish(new, module, sk_keys(module.state_dict()))


def sk_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm's `SelectiveKernel` keys -> `SKConv`'s: `paths.i.conv/bn` -> `convs.i.0/1`, `attn.bn` ->
    `fuse.0`, the 1x1 convolutions `attn.fc_reduce` -> `fc` and `attn.fc_select` -> `fcs.i`."""
    out = rename({k: v for k, v in state.items() if not k.startswith(("attn.fc_", "paths."))},
                  {"attn.bn.": "fuse.0."})
    paths = sorted({int(k.split(".")[1]) for k in state if k.startswith("paths.")})
    for key, value in state.items():
        if key.startswith("paths."):
            _, path, part, rest = key.split(".", 3)
            out[f"convs.{path}.{0 if part == 'conv' else 1}.{rest}"] = value
    if "attn.fc_reduce.weight" in state:
        out["fc.weight"] = state["attn.fc_reduce.weight"].flatten(1)  # (d, C', 1, 1) -> (d, C')
    if "attn.fc_select.weight" in state:
        select = state["attn.fc_select.weight"]
        select = select.reshape(len(paths), -1, select.shape[1])  # (M*C', d, 1, 1) -> (M, C', d)
        for i in paths:
            out[f"fcs.{i}.weight"] = select[i]
    return out


def window_from_timm(module: Any) -> WindowAttention:
    """Swin's `WindowAttention` -> `WindowAttention` (timm's state_dict loads as it is)."""
    qkv: nn.Linear = module.qkv
    if qkv.out_features != 3 * module.dim or module.proj.in_features != module.dim:
        raise refuse(module, f"its head_dim * num_heads ({qkv.out_features // 3}) differs from dim "
                             f"({module.dim}); attnzoo's WindowAttention has dim // num_heads per head")
    new = WindowAttention(
        module.dim,
        tuple(module.window_size),
        module.num_heads,
        qkv_bias=qkv.bias is not None,
        attn_drop=float(module.attn_drop.p),
        proj_drop=float(module.proj_drop.p),
        **factory(module),
    )
    if abs(new.scale - module.scale) > 1e-12 * new.scale:
        raise refuse(module, f"its scale {module.scale} is not head_dim ** -0.5")
    return finish(new, module, module.state_dict())


def window_v2_from_timm(module: Any) -> TimmWindowAttentionV2:
    """Swin V2's `WindowAttention` -> `attnzoo.compat.TimmWindowAttentionV2` (timm's call and keys;
    its state_dict loads as it is)."""
    if module.qkv.out_features != 3 * module.dim or module.proj.in_features != module.dim:
        raise refuse(module, "its head width times num_heads differs from dim")
    new = TimmWindowAttentionV2(
        module.dim, tuple(module.window_size), module.num_heads, qkv_bias=module.q_bias is not None,
        qkv_bias_separate=bool(module.qkv_bias_separate), attn_drop=float(module.attn_drop.p),
        proj_drop=float(module.proj_drop.p), pretrained_window_size=tuple(module.pretrained_window_size),
        **factory(module),
    )
    return finish(new, module, module.state_dict())


def window_cr_from_timm(module: Any) -> TimmWindowMultiHeadAttention:
    """Swin V2 CR's `WindowMultiHeadAttention` -> `attnzoo.compat.TimmWindowMultiHeadAttention` (timm's
    meta network copied as it is)."""
    qkv: nn.Linear = module.qkv
    if qkv.bias is None or module.proj.bias is None:
        raise refuse(module, "its qkv or proj has no bias (timm's always have)")
    new = TimmWindowMultiHeadAttention(
        qkv.in_features, module.num_heads, tuple(module.window_size), drop_attn=float(module.attn_drop.p),
        drop_proj=float(module.proj_drop.p), meta_hidden_dim=module.meta_mlp.fc1.out_features,
        sequential_attn=bool(module.sequential_attn), **factory(module),
    )
    new.meta_mlp = copy.deepcopy(module.meta_mlp)  # type: ignore[assignment]
    return finish(new, module, module.state_dict())


def nonlocal_from_timm(module: Any) -> NonLocalBlock:
    """timm's `NonLocalAttn` (create_attn "nl") -> `NonLocalBlock` with `pool_keys=False`,
    `qk_scale` = timm's `scale` (`C ** -0.5`, or 1) and BatchNorm after the output convolution."""
    plain_batchnorm(module, module.norm)
    t: nn.Conv2d = module.t
    new = NonLocalBlock(
        t.in_channels,
        t.out_channels,
        pool_keys=False,
        batch_norm=True,
        qk_scale=float(module.scale),
        **factory(module),
    )
    same_norm(new.get_submodule("W.1"), module.norm)
    new.register_load_state_dict_pre_hook(TimmKeys(nonlocal_keys, ("t.", "p.", "z.", "norm.")))
    return finish(new, module, nonlocal_keys(module.state_dict()))


def nonlocal_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm's `NonLocalAttn` keys -> `NonLocalBlock`'s."""
    return rename(state, {"t.": "theta.", "p.": "phi.", "z.": "W.0.", "norm.": "W.1."})


EXISTING_CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "timm.layers.squeeze_excite.SEModule": se_from_timm,
    "timm.layers.cbam.CbamModule": cbam_from_timm,
    "timm.layers.selective_kernel.SelectiveKernel": sk_from_timm,
    "timm.models.swin_transformer.WindowAttention": window_from_timm,
    "timm.models.swin_transformer_v2.WindowAttention": window_v2_from_timm,
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention": window_cr_from_timm,
    "timm.layers.non_local_attn.NonLocalAttn": nonlocal_from_timm,
}
