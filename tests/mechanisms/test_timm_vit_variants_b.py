"""NesT's, Visformer's, TNT's and MetaFormer's attention against timm's modules: float64 outputs and
gradients (dropout included, under one seed), keys both ways, whole models after `replace`."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms.test_timm_vit_variants import _same

import attnzoo
from attnzoo.compat import TimmAttention, TimmNestAttention, TimmTntAttention, TimmVisformerAttention
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.models import metaformer, nest, tnt, visformer  # noqa: E402

D = torch.float64

CASES = [
    (nest.Attention, TimmNestAttention, {"dim": 16, "num_heads": 2}, (2, 3, 5, 16)),
    (nest.Attention, TimmNestAttention, {"dim": 12, "num_heads": 3, "qkv_bias": True, "attn_drop": 0.3,
                                         "proj_drop": 0.2}, (1, 4, 6, 12)),
    (visformer.Attention, TimmVisformerAttention, {"dim": 16, "num_heads": 2}, (2, 16, 3, 5)),
    (visformer.Attention, TimmVisformerAttention, {"dim": 24, "num_heads": 3, "head_dim_ratio": 0.5,
                                                   "attn_drop": 0.3, "proj_drop": 0.2}, (2, 24, 4, 1)),
    (tnt.Attention, TimmTntAttention, {"dim": 16, "hidden_dim": 8, "num_heads": 2}, (2, 7, 16)),
    (tnt.Attention, TimmTntAttention, {"dim": 12, "hidden_dim": 24, "num_heads": 4, "qkv_bias": True,
                                       "attn_drop": 0.3, "proj_drop": 0.2}, (2, 5, 12)),
    (metaformer.Attention, TimmAttention, {"dim": 16, "head_dim": 8}, (2, 7, 16)),
    (metaformer.Attention, TimmAttention, {"dim": 12, "head_dim": 4, "qkv_bias": True, "proj_bias": True,
                                           "attn_drop": 0.3, "proj_drop": 0.2}, (2, 5, 12)),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("foreign", "ours_cls", "kwargs", "shape"), CASES)
def test_matches_timm(foreign, ours_cls, kwargs, shape, train):
    theirs = randomize(foreign(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is ours_cls and set(ours.state_dict()) == set(theirs.state_dict())
    x = torch.randn(*shape, dtype=D)
    if foreign is tnt.Attention and train and kwargs.get("attn_drop"):
        # timm drops the weights in place: its own backward fails; the forward (masks too) is the same
        torch.manual_seed(1)
        want = theirs(x.requires_grad_())
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            want.sum().backward()
        torch.manual_seed(1)
        got = ours(x)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
        got.sum().backward()
        return
    _same(theirs, ours, x)
    theirs.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize(
    ("arch", "foreign", "size", "count"),
    [("nest_tiny", nest.Attention, 224, 12), ("visformer_tiny", visformer.Attention, 224, 8),
     ("tnt_s_patch16_224", tnt.Attention, 224, 24), ("caformer_s18", metaformer.Attention, 64, 12)],
)
def test_whole_models_keep_their_logits_and_checkpoints(arch, foreign, size, count):
    model = randomize(timm.create_model(arch, pretrained=False, num_classes=3), seed=3).eval()
    reference = copy.deepcopy(model)
    assert len(attnzoo.replace(model, foreign)) == count
    x = torch.randn(1, 3, size, size, dtype=D)
    with torch.no_grad():
        want = reference(x)
        torch.testing.assert_close(model(x), want, atol=1e-10 * want.abs().max().item(), rtol=1e-10)
    model.load_state_dict(reference.state_dict(), strict=True)


def test_errors_where_timm_fails():
    with pytest.raises(ValueError, match="C=16"):
        TimmNestAttention(16, 2)(torch.randn(1, 2, 3, 12))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TimmTntAttention(16, 9, 2)
    with pytest.raises(ValueError, match="head_dim"):
        TimmVisformerAttention(16, 2, head_dim_ratio=0.01)


def test_nest_map_rows_are_per_block_with_the_block_axis_in_meta():
    """NesT attends within each block: the captured rows have the blocks folded into the first axis
    (b*T + t), said in meta, and row (b, t) is block t of sample b attending over its own tokens."""
    torch.manual_seed(0)
    module = TimmNestAttention(16, 2).double()
    x = torch.randn(2, 4, 9, 16, dtype=torch.float64)
    with attnzoo.capture_maps(module, queries=[(i,) for i in range(9)]) as maps:
        module(x)
    ((record,),) = maps.values()
    assert record.data.shape == (8, 2, 9, 9) and record.meta["blocks"] == 4
    q, k, _ = module.qkv(x).reshape(2, 4, 9, 3, 2, 8).permute(3, 0, 1, 4, 2, 5)  # (B, T, h, N, d)
    expected = (q @ k.transpose(-2, -1) * module.scale).softmax(-1).reshape(8, 2, 9, 9)
    torch.testing.assert_close(record.data, expected)
