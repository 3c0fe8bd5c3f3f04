"""The seed user's question, answered: swap a hand-written space/channel attention for CBAM or BRA.

The seed (shared/seeds/001) has a network whose 512-channel feature map goes through a max-pool
gated channel branch and a max-gated spatial branch (each conv-BN-ReLU), and asks how to use
BiLevelRoutingAttention there instead. The answer it got passes an NCHW map to a module that
wants NHWC and reuses one module in two places; here each branch gets its own module, in NCHW.

Run: python examples/surgery_seed_question.py
"""

from __future__ import annotations

import torch
from torch import nn

import attnzoo


class SeedNetwork(nn.Module):
    """A small stand-in for the seed's network around its 512-channel feature map ``x4_0``."""

    def __init__(self, channels: int = 512) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, channels, 3, stride=8, padding=1), nn.ReLU())
        self.channel_attention = self._conv_bn_relu(channels)
        self.space_attention = self._conv_bn_relu(channels)
        self.sigmoid = nn.Sigmoid()

    @staticmethod
    def _conv_bn_relu(channels: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x4_0 = self.backbone(image)
        channel_feature = x4_0 * self.sigmoid(x4_0.amax((2, 3), keepdim=True))
        x = x4_0 + self.channel_attention(channel_feature)
        space_feature = x * self.sigmoid(x.amax(1, keepdim=True))
        return x + self.space_attention(space_feature)


def main() -> None:
    image = torch.randn(2, 3, 224, 224)  # the 512-channel map is (2, 512, 28, 28)

    # 1. CBAM in place of both branches: channels measured at each place.
    net = SeedNetwork()
    attnzoo.replace(net, ["channel_attention", "space_attention"], "cbam", example_input=image)
    print("CBAM:", net(image).shape)

    # 2. BiLevelRoutingAttention with the seed's arguments, one module per branch, NCHW in and out.
    net = SeedNetwork()
    attnzoo.replace(net, ["channel_attention", "space_attention"], "bra",
                    n_win=7, num_heads=8, topk=4, side_dwconv=3, auto_pad=True, example_input=image)
    print("BRA:", net(image).shape)
    for found in attnzoo.find(net, example_input=image):
        print(f"  {found.name}: {found.kind}, {found.params:,} parameters, {found.flops / 1e9:.2f} GFLOPs")


if __name__ == "__main__":
    main()
