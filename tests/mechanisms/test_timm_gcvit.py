"""GC ViT's window attention (attnzoo.compat.TimmGcVitWindowAttention) against timm's
`gcvit.WindowAttentionGlobal`: local and global-query windows, float64 outputs and gradients (dropout
under one seed), keys, a whole GC ViT after `replace`, and errors where timm fails."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms.test_timm_vit_variants import _same

import attnzoo
from attnzoo.compat import TimmGcVitWindowAttention
from attnzoo.convert import from_timm

gcvit = pytest.importorskip("timm.models.gcvit", reason="timm missing")
D = torch.float64


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [{"dim": 16, "num_heads": 2, "window_size": (3, 3), "use_global": False},
     {"dim": 12, "num_heads": 3, "window_size": (2, 3), "use_global": False, "qkv_bias": False,
      "attn_drop": 0.3, "proj_drop": 0.2}],
)
def test_local_windows_match_timm(kwargs, train):
    theirs = randomize(gcvit.WindowAttentionGlobal(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmGcVitWindowAttention and set(ours.state_dict()) == set(theirs.state_dict())
    area = kwargs["window_size"][0] * kwargs["window_size"][1]
    _same(theirs, ours, torch.randn(4, area, kwargs["dim"], dtype=D))


@pytest.mark.parametrize("train", [False, True])
def test_global_queries_match_timm(train):
    theirs = randomize(gcvit.WindowAttentionGlobal(16, 2, (3, 3), use_global=True, attn_drop=0.2).double())
    theirs.train(train)
    ours = from_timm(theirs)
    x = torch.randn(6, 9, 16, dtype=D, requires_grad=True)  # 2 images x 3 windows
    q_global = torch.randn(2, 9, 16, dtype=D, requires_grad=True)
    torch.manual_seed(1)
    want = theirs(x, q_global)
    torch.manual_seed(1)
    got = ours(x, q_global)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [x, q_global, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, q_global, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_a_gcvit_keeps_its_logits_and_checkpoint_after_replace():
    timm = pytest.importorskip("timm")
    model = randomize(timm.create_model("gcvit_xxtiny", pretrained=False, num_classes=3), seed=2).eval()
    reference = copy.deepcopy(model)
    assert len(attnzoo.replace(model, gcvit.WindowAttentionGlobal)) == 12
    x = torch.randn(1, 3, 224, 224, dtype=D)
    with torch.no_grad():
        want = reference(x)
        torch.testing.assert_close(model(x), want, atol=1e-10 * want.abs().max().item(), rtol=1e-10)
    model.load_state_dict(reference.state_dict(), strict=True)


def test_errors_where_timm_fails():
    attn = TimmGcVitWindowAttention(16, 2, 3, use_global=True)
    with pytest.raises(ValueError, match="needs q_global"):
        attn(torch.randn(2, 9, 16))
    with pytest.raises(ValueError, match="images \\(4\\) to divide the windows \\(6\\)"):
        attn(torch.randn(6, 9, 16), torch.randn(4, 9, 16))
    with pytest.raises(ValueError, match="N=9"):
        TimmGcVitWindowAttention(16, 2, 3, use_global=False)(torch.randn(2, 8, 16))
