"""The seed's dual max-gated block: golden outputs (seed and canonical class), a plain reference,
errors, and DualGatedAttention as timm's attn_layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _gating import (
    check_layouts,
    check_no_grad_path,
    check_resnet_forward,
    compare,
    golden_params,
    run_golden,
    x_of,
)
from conftest import golden_files
from torch import nn

import attnzoo
from attnzoo import DualGatedAttention, compat


class RefDual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()

        def cbr():
            return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())

        self.space_attention, self.channel_attention = cbr(), cbr()

    def forward(self, x):
        x = x + self.channel_attention(x * torch.sigmoid(F.adaptive_max_pool2d(x, 1)))
        return x + self.space_attention(
            x * torch.sigmoid(torch.max(x, 1)[0].unsqueeze(1))
        )  # (B, H, W) -> (B, 1, H, W)


@pytest.mark.parametrize("path", golden_params(golden_files("seed/SeedDualAttention__*.pt")))
@pytest.mark.parametrize("cls", [compat.SeedDualAttention, DualGatedAttention])
def test_golden_seed_outputs(path, cls):
    run_golden(cls, path)
    run_golden(cls, path, grad=True)


@pytest.mark.parametrize("train", [False, True])
def test_dual_gated_matches_reference(train):
    compare(DualGatedAttention(6), RefDual(6), x_of(2, 6, 5, 7), train=train)


def test_layouts_and_no_grad_path():
    check_layouts("dual_gated")
    check_no_grad_path("dual_gated")


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match=r"channels must be >= 1, got 0"):
        DualGatedAttention(0)
    with pytest.raises(ValueError, match=r"DualGatedAttention expects x of shape \(B, 4, H, W\) \(4-D\)"):
        DualGatedAttention(4)(torch.randn(4, 4, 4))


def test_seed_name_builds_the_seed_class():
    assert type(attnzoo.create("SeedDualAttention", channels=4)) is compat.SeedDualAttention
    assert type(attnzoo.create("dual_gated", 4)) is DualGatedAttention


def test_timm_resnet_takes_dual_gated_attention():
    check_resnet_forward(DualGatedAttention)
