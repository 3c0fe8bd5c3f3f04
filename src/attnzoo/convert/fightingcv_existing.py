"""fightingcv -> attnzoo for the existing mechanisms: fightingcv-attention's `SEAttention`,
`CBAMBlock`, `SKAttention` and `ACmix` -> `SqueezeExcite`, `CBAM`, `SKConv`, `ACmix`.

`EXISTING_CONVERTERS` maps fightingcv's dotted class names (xmu-xiaoma666/External-Attention-pytorch,
package `fightingcv_attention`) to the converters; `attnzoo.convert.fightingcv` adds them to
`FIGHTINGCV_CONVERTERS`, so `from_fightingcv`, `attnzoo.convert.convert` and `attnzoo.replace`
reach them. fightingcv is never imported here. Each result holds a copy of the module's weights
(same device, dtype and training flag), loaded with `strict=True` after the key renaming each
converter documents (`rename` does it for a checkpoint); fightingcv's particularities are options of
the canonical classes (docs/interop.md lists them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from attnzoo.convert._timm_common import rename, same_norm
from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.acmix import ACmix
from attnzoo.mechanisms.cbam import CBAM
from attnzoo.mechanisms.se import SqueezeExcite
from attnzoo.mechanisms.sk import SKConv

__all__ = ["EXISTING_CONVERTERS", "rename"]

_PACKAGE = "fightingcv_attention.attention"
WHO = "from_fightingcv"


def _kinds(module: nn.Module, seq: nn.Module, kinds: tuple[type[nn.Module], ...], what: str) -> None:
    """Refuse unless `seq` is a Sequential of exactly the layer types `kinds`."""
    got = tuple(type(m) for m in seq) if isinstance(seq, nn.Sequential) else (type(seq),)
    if got != kinds:
        names = ", ".join(k.__name__ for k in kinds)
        raise refuse(module, f"its {what} is {[k.__name__ for k in got]}, not [{names}]", WHO)


# ---------------------------------------------------------------------------------------------
# The converters


def se_from_fightingcv(module: Any) -> SqueezeExcite:
    """`SEAttention(channel, reduction)` -> `SqueezeExcite` with `rd_channels = channel // reduction`,
    no biases; `fc.0`/`fc.2` (Linear) become `fc1`/`fc2` (1x1 convolutions)."""
    _kinds(module, module.fc, (nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid), "fc")
    fc1, fc2 = module.fc[0], module.fc[2]
    if fc1.bias is not None or fc2.bias is not None:
        raise refuse(module, "its fc layers have biases (fightingcv's have none)", WHO)
    new = SqueezeExcite(fc1.in_features, rd_channels=fc1.out_features, bias=False, **factory(module))
    state = {"fc1.weight": fc1.weight[:, :, None, None], "fc2.weight": fc2.weight[:, :, None, None]}
    return finish(new, module, state)  # (rd, C) -> (rd, C, 1, 1) and (C, rd) -> (C, rd, 1, 1)


def cbam_from_fightingcv(module: Any) -> CBAM:
    """`CBAMBlock(channel, reduction, kernel_size)` -> `CBAM` with `pool_order="max_mean"`,
    `spatial_bias=True`, `residual=True` and fightingcv's kernel; `ca.se.*` -> `ca.sharedMLP.*`."""
    _kinds(module, module.ca.se, (nn.Conv2d, nn.ReLU, nn.Conv2d), "ca.se")
    conv: nn.Conv2d = module.sa.conv
    size = conv.kernel_size[0]
    if conv.kernel_size != (size, size) or size % 2 == 0:
        raise refuse(module, f"its spatial kernel {conv.kernel_size} is not odd and square (fightingcv's "
                             "forward fails for an even one)", WHO)
    fc1: nn.Conv2d = module.ca.se[0]
    new = CBAM(
        fc1.in_channels,
        kernel_size=size,
        rd_channels=fc1.out_channels,
        bias=fc1.bias is not None,
        spatial_bias=conv.bias is not None,
        pool_order="max_mean",
        residual=True,
        **factory(module),
    )
    return finish(new, module, rename(module.state_dict(), {"ca.se.": "ca.sharedMLP."}))


def sk_from_fightingcv(module: Any) -> SKConv:
    """`SKAttention(channel, kernels, reduction, group, L)` -> `SKConv` with `kernel_sizes=kernels`
    (a 1 included), `rd_channels = d`, `groups = group`; `convs.i.conv`/`convs.i.bn` ->
    `convs.i.0`/`convs.i.1`."""
    convs = [branch.conv for branch in module.convs]
    for branch in module.convs:
        _kinds(module, branch, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU), "branch")
    for conv in convs:
        k = conv.kernel_size[0]
        same = conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2) and conv.stride == (1, 1)
        if not same or k % 2 == 0:
            raise refuse(module, f"a branch ({conv}) is not an odd, same-padded, stride-1 convolution", WHO)
    new = SKConv(
        convs[0].in_channels,
        len(convs),
        groups=convs[0].groups,
        rd_channels=module.d,
        kernel_sizes=[c.kernel_size[0] for c in convs],
        bias=convs[0].bias is not None,
        **factory(module),
    )
    for i, branch in enumerate(module.convs):
        bn = new.get_submodule(f"convs.{i}.1")
        same_norm(bn, branch.bn)
    names = {}
    for i in range(len(convs)):
        names[f"convs.{i}.conv."], names[f"convs.{i}.bn."] = f"convs.{i}.0.", f"convs.{i}.1."
    return finish(new, module, rename(module.state_dict(), names))


def acmix_from_fightingcv(module: Any) -> ACmix:
    """fightingcv's `ACmix` (the official one: same keys) -> `attnzoo.ACmix`."""
    if module.dep_conv.bias is not None:
        raise refuse(module, "its dep_conv has a bias (fightingcv's reset_parameters removes it)", WHO)
    if module.kernel_conv != 3:
        raise refuse(module, f"kernel_conv={module.kernel_conv}: fightingcv pads its conv branch by 1, "
                             "so only kernel_conv=3 keeps the output size", WHO)
    new = ACmix(
        module.in_planes,
        module.out_planes,
        module.kernel_att,
        module.head,
        module.kernel_conv,
        module.stride,
        module.dilation,
        **factory(module),
    )
    return finish(new, module, module.state_dict())


EXISTING_CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    f"{_PACKAGE}.SEAttention.SEAttention": se_from_fightingcv,
    f"{_PACKAGE}.CBAM.CBAMBlock": cbam_from_fightingcv,
    f"{_PACKAGE}.SKAttention.SKAttention": sk_from_fightingcv,
    f"{_PACKAGE}.ACmixAttention.ACmix": acmix_from_fightingcv,
}
