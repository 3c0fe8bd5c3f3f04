"""timm's BEiT attention as `attnzoo.compat.TimmBeitAttention`: float64 parity with timm (relative
position bias with the class token's rows, q/v biases, a shared bias, dropout), a whole BEiT swapped
by `attnzoo.replace` with its logits and checkpoint, the bias index, and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.convert._parity import randomize

import attnzoo
from attnzoo.compat import TimmBeitAttention
from attnzoo.convert import from_timm
from attnzoo.mechanisms.timm_beit import relative_position_index

beit = pytest.importorskip("timm.models.beit", reason="timm missing")
D = torch.float64


@pytest.mark.parametrize("kwargs", [
    {"dim": 16, "num_heads": 2},
    {"dim": 16, "num_heads": 4, "qkv_bias": True, "window_size": (3, 2)},
    {"dim": 12, "num_heads": 3, "qkv_bias": True, "qkv_bias_separate": True, "window_size": (2, 2)},
    {"dim": 16, "num_heads": 2, "qkv_bias": True, "window_size": (2, 3), "attn_drop": 0.3, "proj_drop": 0.2},
])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_matches_timm_float64(kwargs: dict, train: bool, shared: bool) -> None:
    theirs = randomize(beit.Attention(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmBeitAttention and ours.training == train
    window = kwargs.get("window_size")
    tokens = 1 + window[0] * window[1] if window else 6
    x = torch.randn(2, tokens, kwargs["dim"], dtype=D, requires_grad=True)
    bias = torch.randn(kwargs["num_heads"], tokens, tokens, dtype=D) if shared else None  # timm's (h, N, N)
    torch.manual_seed(1)
    want = theirs(x, shared_rel_pos_bias=bias)
    torch.manual_seed(1)
    got = ours(x, shared_rel_pos_bias=bias)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0],
                               atol=1e-9, rtol=1e-9)


def test_index_is_beits() -> None:
    for window in [(2, 3), (4, 4), (1, 5)]:
        torch.testing.assert_close(relative_position_index(window), beit.gen_relative_position_index(window))


def test_replace_in_a_timm_beit_keeps_logits_checkpoint_and_maps() -> None:
    model = beit.Beit(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                      use_abs_pos_emb=False, use_rel_pos_bias=True).double().eval()
    randomize(model, seed=2)
    checkpoint = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=D)
    with torch.no_grad():
        want = model(x)
    assert attnzoo.replace(model, beit.Attention) == ["blocks.0.attn", "blocks.1.attn"]
    model.load_state_dict(checkpoint, strict=True)  # timm's keys, unchanged
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-10, rtol=1e-10)
        with attnzoo.capture_maps(model) as maps:
            model(x)
    assert len(maps) == 2
    model.train()
    model(x).square().mean().backward()  # one training step's gradients are finite
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_errors_name_what_was_expected() -> None:
    attn = TimmBeitAttention(8, 2, window_size=(2, 2))
    with pytest.raises(ValueError, match=r"\(B, 5, 8\)"):
        attn(torch.randn(1, 4, 8))  # a window of 2 x 2 patches and the class token
    with pytest.raises(ValueError, match="shared_rel_pos_bias"):
        attn(torch.randn(1, 5, 8), shared_rel_pos_bias=torch.randn(3, 5, 5))
    with pytest.raises(TypeError, match="window_size"):
        TimmBeitAttention(8, 2, window_size=7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        TimmBeitAttention(10, 3)
