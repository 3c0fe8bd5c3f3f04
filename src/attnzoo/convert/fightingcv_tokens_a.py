"""fightingcv -> attnzoo for token mixers (group A): fightingcv-attention's `ExternalAttention`,
`ScaledDotProductAttention`, `SimplifiedScaledDotProductAttention`, `EMSA`, `MUSEAttention`, `AFT_FULL`
and `UFOAttention`.

`CONVERTERS` maps fightingcv's dotted class names to converters; `attnzoo.convert.fightingcv` adds
them to `FIGHTINGCV_CONVERTERS`. fightingcv is never imported here. Each result holds a copy of the
module's weights (same device, dtype and training flag), loaded with `strict=True`. Where fightingcv's
forward differs from the canonical class (argument conventions, bugs) the converter's docstring says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from attnzoo.convert._timm_common import rename
from attnzoo.convert.timm_existing import factory, finish, refuse
from attnzoo.mechanisms.aft import AFTFull
from attnzoo.mechanisms.emsa import EMSA
from attnzoo.mechanisms.external import ExternalAttention
from attnzoo.mechanisms.mha import MultiHeadAttention
from attnzoo.mechanisms.muse import MUSEAttention
from attnzoo.mechanisms.ufo import UFOAttention

__all__ = ["CONVERTERS", "EMSA_KEYS", "MUSE_KEYS", "SDPA_KEYS", "SIMPLIFIED_SDPA_KEYS"]

_PACKAGE = "fightingcv_attention.attention"
WHO = "from_fightingcv"

# fightingcv's key prefixes -> attnzoo's (`rename`): the converters' state and the load hook of the
# modules `replace` swaps in (`fightingcv_calls`) translate with the same tables.
PROJECTION_KEYS = {"fc_q": "q", "fc_k": "k", "fc_v": "v", "fc_o": "proj"}
SDPA_KEYS = {"fc_q": "Wq", "fc_k": "Wk", "fc_v": "Wv", "fc_o": "fc"}
SIMPLIFIED_SDPA_KEYS = {"fc_o": "fc"}
EMSA_KEYS = {**PROJECTION_KEYS, "sr_conv": "sr", "sr_ln": "sr_norm", "transform.conv": "transform"}
MUSE_KEYS = {
    **PROJECTION_KEYS, "conv1.pointwise_conv": "branches.0.point", "conv3.depth_conv": "branches.1.depth",
    "conv3.pointwise_conv": "branches.1.point", "conv5.depth_conv": "branches.2.depth",
    "conv5.pointwise_conv": "branches.2.point", "dy_paras": "branch_weights",
}


def external_from_fightingcv(module: Any) -> ExternalAttention:
    """`ExternalAttention(d_model, S)` -> `ExternalAttention(d_model, memory_size=S, eps=0.0)` (fightingcv
    adds no epsilon to the $\\ell_1$ denominator); same keys `mk.weight`, `mv.weight`."""
    mk: nn.Linear = module.mk
    new = ExternalAttention(mk.in_features, memory_size=mk.out_features, eps=0.0, **factory(module))
    return finish(new, module, module.state_dict())


def _dropout_p(module: Any) -> float:
    drop = module.dropout
    if not isinstance(drop, nn.Dropout):
        raise refuse(module, f"its dropout is a {type(drop).__qualname__}, not an nn.Dropout", WHO)
    return float(drop.p)


def _renamed(module: Any, names: dict[str, str]) -> dict[str, Any]:
    """The state of `module`'s sub-layers under new prefixes: `{"fc_q": "q"}` maps `fc_q.weight` ->
    `q.weight`."""
    return {
        f"{new}.{kind}": value
        for old, new in names.items()
        for kind, value in module.get_submodule(old).state_dict().items()
    }


def sdpa_from_fightingcv(module: Any) -> MultiHeadAttention:
    """`ScaledDotProductAttention(d_model, d_k, d_v, h, dropout)` -> `MultiHeadAttention(d_model, h,
    head_dim=d_k, value_head_dim=d_v, attn_drop=dropout)`; `fc_q/fc_k/fc_v/fc_o` -> `Wq/Wk/Wv/fc`.

    Calls: fightingcv's `forward(queries, keys, values, attention_mask)` is `forward(queries, keys,
    values, mask=~attention_mask)` here (fightingcv's True masks a logit, attnzoo's True keeps it); a
    query with every key masked gives NaN in fightingcv and 0 here. fightingcv's multiplicative
    `attention_weights` on the logits has no canonical counterpart (pass an additive float `mask`
    where a bias is meant)."""
    state = rename(module.state_dict(), SDPA_KEYS)
    new = MultiHeadAttention(
        module.d_model, module.h, qkv_bias=module.fc_q.bias is not None, attn_drop=_dropout_p(module),
        head_dim=module.d_k, value_head_dim=module.d_v, **factory(module),
    )
    return finish(new, module, state)


def simplified_sdpa_from_fightingcv(module: Any) -> MultiHeadAttention:
    """`SimplifiedScaledDotProductAttention(d_model, h, dropout)` (no query/key/value projections) ->
    `MultiHeadAttention(d_model, h, in_proj=False)` (the inputs split into heads as they are) with
    `fc_o` -> `fc`. Masks as for `ScaledDotProductAttention`.
    fightingcv's forward fails unless `h` divides `d_model`: such a module is refused."""
    if module.d_model != module.h * module.d_k:
        raise refuse(module, f"d_model={module.d_model} is not divisible by h={module.h} "
                             "(fightingcv's forward fails for it)", WHO)
    new = MultiHeadAttention(
        module.d_model, module.h, in_proj=False, attn_drop=_dropout_p(module), **factory(module)
    )
    state = rename(module.state_dict(), SIMPLIFIED_SDPA_KEYS)
    return finish(new, module, state)


def emsa_from_fightingcv(module: Any) -> EMSA:
    """`EMSA(d_model, d_k, d_v, h, dropout, H, W, ratio, apply_transform)` -> `EMSA(d_model, h,
    head_dim=d_k, value_head_dim=d_v, sr_ratio=ratio, apply_transform=...)`; `fc_q/fc_k/fc_v/fc_o` ->
    `q/k/v/proj`, `sr_conv`/`sr_ln` -> `sr`/`sr_norm`, `transform.conv` -> `transform`.

    Calls: fightingcv's `forward(x, x, x)` on its H x W map is `forward(x)` here (`feat_size=(H, W)`;
    other maps: `forward(x, size=(h, w))`); fightingcv ignores `keys`/`values` when `ratio > 1`. Its
    `attention_mask` (applied after the normalisation, giving infinite/NaN outputs) and
    `attention_weights` have no counterpart."""
    if module.ratio > 1 and (module.sr_ln.eps != 1e-5 or not module.sr_ln.elementwise_affine):
        raise refuse(module, "its sr_ln is not a default LayerNorm", WHO)
    if module.apply_transform:
        norm = module.transform.get_submodule("in")
        if norm.affine or norm.track_running_stats or norm.eps != 1e-5:
            raise refuse(module, "its transform's InstanceNorm2d is not the default one", WHO)
    state = rename(module.state_dict(), EMSA_KEYS)
    new = EMSA(
        module.d_model, module.h, head_dim=module.d_k, value_head_dim=module.d_v,
        sr_ratio=max(module.ratio, 1), apply_transform=module.apply_transform,
        qkv_bias=module.fc_q.bias is not None, attn_drop=_dropout_p(module),
        feat_size=(module.H, module.W), **factory(module),
    )
    return finish(new, module, state)


def muse_from_fightingcv(module: Any) -> MUSEAttention:
    """`MUSEAttention(d_model, d_k, d_v, h, dropout)` -> `MUSEAttention(d_model, h, head_dim=d_k,
    value_head_dim=d_v, kernel_sizes=(1, 3, 5))`; `fc_q/fc_k/fc_v/fc_o` -> `q/k/v/proj`,
    `conv{k}.depth_conv/pointwise_conv` -> `branches.{i}.depth/point`, `dy_paras` -> `branch_weights`.

    fightingcv's forward replaces `dy_paras` by `softmax(dy_paras)` on every call; the converted
    module softmaxes the copied value in every forward, so it equals fightingcv's *next* call (and
    every call, if fightingcv's parameter is reset). Masks: `mask=~attention_mask`."""
    if not isinstance(module.conv1.depth_conv, nn.Identity):
        raise refuse(module, "its conv1 has a depth-wise convolution", WHO)
    state = rename(module.state_dict(), MUSE_KEYS)
    new = MUSEAttention(
        module.d_model, module.h, head_dim=module.d_k, value_head_dim=module.d_v, kernel_sizes=(1, 3, 5),
        qkv_bias=module.fc_q.bias is not None, attn_drop=_dropout_p(module), **factory(module),
    )
    return finish(new, module, state)


def aft_full_from_fightingcv(module: Any) -> AFTFull:
    """`AFT_FULL(d_model, n, simple)` -> `AFTFull(d_model, max_len=n, simple=simple)`;
    `fc_q/fc_k/fc_v` -> `q/k/v`, `position_biases` -> `position_bias` (none when `simple`). fightingcv
    needs exactly `n` tokens; the converted module takes any number up to `n`."""
    simple = not isinstance(module.position_biases, nn.Parameter)
    if simple and bool(module.position_biases.ne(0).any()):
        raise refuse(module, "its fixed position_biases are not zero", WHO)
    state = _renamed(module, {"fc_q": "q", "fc_k": "k", "fc_v": "v"})
    if not simple:
        state["position_bias"] = module.position_biases
    new = AFTFull(module.d_model, max_len=module.n, simple=simple,
                  qkv_bias=module.fc_q.bias is not None, **factory(module))
    return finish(new, module, state)


def ufo_from_fightingcv(module: Any) -> UFOAttention:
    """`UFOAttention(d_model, d_k, d_v, h, dropout)` -> `UFOAttention(d_model, h, head_dim=d_k,
    value_head_dim=d_v, eps=0.0)`; `fc_q/fc_k/fc_v/fc_o` -> `q/k/v/proj`, `gamma` kept. fightingcv's
    dropout is never applied, so it is dropped."""
    state = rename(module.state_dict(), PROJECTION_KEYS)  # gamma keeps its name
    new = UFOAttention(
        module.d_model, module.h, head_dim=module.d_k, value_head_dim=module.d_v,
        qkv_bias=module.fc_q.bias is not None, eps=0.0, **factory(module),
    )
    return finish(new, module, state)


CONVERTERS: dict[str, Callable[[Any], nn.Module]] = {
    f"{_PACKAGE}.ExternalAttention.ExternalAttention": external_from_fightingcv,
    f"{_PACKAGE}.SelfAttention.ScaledDotProductAttention": sdpa_from_fightingcv,
    f"{_PACKAGE}.SimplifiedSelfAttention.SimplifiedScaledDotProductAttention": (
        simplified_sdpa_from_fightingcv
    ),
    f"{_PACKAGE}.EMSA.EMSA": emsa_from_fightingcv,
    f"{_PACKAGE}.MUSEAttention.MUSEAttention": muse_from_fightingcv,
    f"{_PACKAGE}.AFT.AFT_FULL": aft_full_from_fightingcv,
    f"{_PACKAGE}.UFOAttention.UFOAttention": ufo_from_fightingcv,
}
