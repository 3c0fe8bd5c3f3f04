"""`attnzoo maps`: a mechanism's attention maps over an image, as a PNG grid of overlays.

The mechanism is trained a few steps inside the demo network first (`--train`, so gates show what
they learnt), or runs untrained on fixed image features (`--train 0`).
"""

from __future__ import annotations

import argparse
import importlib.resources
import os

import torch
from torch import Tensor

from attnzoo._registry import get_spec
from attnzoo.cli import demo
from attnzoo.cli.console import CLIError, check_picture_path
from attnzoo.surgery.build import Unsupported, build_nchw

__all__ = ["MAPS_TRAIN_STEPS", "image_features", "run", "sample_image"]

# A few steps of the demo task: enough for gates to move away from their flat start.
MAPS_TRAIN_STEPS = 40
# The image side the command takes: at 2048 a run peaks at 2-3 GB resident (se, window); far larger
# sides ran out of memory before anything was drawn.
MAX_SIZE = 2048


def sample_image() -> str:
    """Path of the sample image shipped with attnzoo (a few shapes, 112 x 112)."""
    return str(importlib.resources.files("attnzoo.cli") / "data" / "shapes.png")


def _parse_queries(text: str | None) -> list[tuple[float, ...]] | None:
    if text is None:
        return None
    points: list[tuple[float, ...]] = []
    expected = f"--queries expects fractions in [0, 1] as 'y,x;y,x' such as 0.5,0.5;0.2,0.8, got {text!r}"
    for part in text.split(";"):
        try:
            point = tuple(float(v) for v in part.split(","))
        except ValueError:
            raise ValueError(expected) from None
        # A point is (y, x) on the 2-D map: one value or three were taken as some other point.
        if len(point) != 2 or not all(0.0 <= v <= 1.0 for v in point):  # (NaN fails this too)
            raise ValueError(expected)
        points.append(point)
    return points


def image_features(image: Tensor, channels: int, seed: int = 0) -> Tensor:
    """Fixed features of a `(3, H, W)` image at half resolution, `(1, channels, H/2, W/2)`.

    Colour, brightness and edge responses (Sobel, two scales) mixed by a seeded random 1x1
    projection and a ReLU: an untrained but image-dependent stand-in for a CNN's early features,
    so that the maps of an untrained attention module follow what is in the picture.
    """
    x = image[None]  # (1, 3, H, W)
    gray = x.mean(1, keepdim=True)  # (1, 1, H, W)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel, sobel.t()])[:, None]  # (2, 1, 3, 3)
    edges = torch.nn.functional.conv2d(gray, kernels, padding=1)  # (1, 2, H, W)
    blurred = torch.nn.functional.avg_pool2d(gray, 5, 1, 2)
    coarse = torch.nn.functional.conv2d(blurred, kernels, padding=1)  # (1, 2, H, W)
    base = torch.cat([x, gray, edges, edges.norm(dim=1, keepdim=True), coarse], 1)  # (1, 9, H, W)
    base = (base - base.mean((2, 3), keepdim=True)) / base.std((2, 3), keepdim=True).clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, base.shape[1], generator=gen) / base.shape[1] ** 0.5
    feats = torch.relu(torch.einsum("oc,bchw->bohw", weight, base))  # (1, C, H, W)
    return torch.nn.functional.avg_pool2d(feats, 2)


def run(args: argparse.Namespace) -> int:
    from attnzoo.cli.plots import load_image, plot_maps
    from attnzoo.maps.capture import capture_maps

    spec = get_spec(args.name)
    queries = _parse_queries(args.queries)
    if not 8 <= args.size <= MAX_SIZE:
        raise CLIError(f"--size expects 8 to {MAX_SIZE} pixels a side, got {args.size}")
    if args.train < 0:
        raise CLIError(f"--train expects a number of steps >= 0, got {args.train}")
    if args.channels < 1:
        raise CLIError(f"--channels expects a positive count, got {args.channels}")
    check_picture_path(args.out)
    image = load_image(args.image or sample_image(), size=args.size)
    try:
        if args.train:  # the mechanism inside the demo network, trained a little on the demo task
            if args.channels != demo.OddShapeNet.channels:
                raise CLIError(f"--channels applies with --train 0 only (the demo network has "
                               f"{demo.OddShapeNet.channels} channels), got {args.channels}")
            net = demo.trained_net(spec, args.size, args.train, args.seed)
            with torch.no_grad():
                feats = net.stem(image[None])  # (1, 32, H/4, W/4)
            module, state = net.attn, f"trained {args.train} steps on the demo task"
        else:  # untrained, on fixed image features
            feats = image_features(image, args.channels, args.seed)
            module = build_nchw(spec, args.channels, (feats.shape[2], feats.shape[3]), seed=args.seed).eval()
            state = "untrained"
    except Unsupported as err:
        raise CLIError(f"{spec.name} cannot run on a {args.channels}-channel feature map: {err}") from None
    grid = (feats.shape[2], feats.shape[3])
    mechanism = next((m for m in module.modules() if isinstance(m, spec.cls)), module)
    with torch.no_grad(), capture_maps(mechanism, queries=queries, token_grid=grid) as maps:
        module(feats)
    if not maps:
        raise CLIError(f"{spec.name} recorded no attention maps (its module does not record any yet)")
    # Name the records from the mechanism: its own as its registry name, its parts' below it.
    root = type(mechanism).__name__
    maps = {spec.name if name == root else f"{spec.name}.{name}": records for name, records in maps.items()}
    source = os.path.basename(args.image or sample_image())
    title = f"{spec.name} ({spec.cls.__name__}, {state}, seed {args.seed}) on {source}"
    count = plot_maps(image, maps, args.out, title=title, token_grid=grid)
    kinds = ", ".join(f"{name}: {'/'.join(m.kind for m in records)}" for name, records in maps.items())
    print(f"wrote {args.out} ({count} panels; {kinds})")
    return 0


# ---------------------------------------------------------------------------------------------
# attnzoo demo
