"""The `attnzoo demo` task: find the odd shape, with and without attention.

Each 64 x 64 image holds a few distractors of one kind (rings or crosses) and one odd shape, a
circle, a square or a triangle; the label is the odd shape's kind (chance is 1/3). Colours and
positions are random (sizes vary a little), so only the shapes tell, and only the odd shape
carries the label: an attention map that helps should fall on it. A small CNN learns it with and without an
attention module after its second stage (16 x 16 maps, 32 channels); the demo reports held-out
accuracy, training time, and how much of each attention map falls on the odd shape.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._registry import Spec, get_spec, list_modules
from attnzoo.cli.console import CLIError, Progress, check_picture_path, plural, resolve, table
from attnzoo.surgery.build import Unsupported, build_nchw

__all__ = ["KINDS", "make_shapes", "OddShapeNet", "train", "evaluate", "Result", "peak_on_odd_shape", "run"]

KINDS = ("circle", "square", "triangle")
DISTRACTORS = ("ring", "cross")
DEFAULT_ATTENTION = ("cbam", "sagan", "bra")  # those registered are compared with no attention
SIZE = 64


def _shape_masks(kind: Tensor, cy: Tensor, cx: Tensor, r: Tensor, size: int) -> Tensor:
    """Masks `(..., size, size)` of shapes with the given kinds, centres and radii (each `(...)`)."""
    coords = torch.arange(size, dtype=torch.float32)
    dy = coords[:, None] - cy[..., None, None]  # (..., size, 1)
    dx = coords[None, :] - cx[..., None, None]  # (..., 1, size)
    r = r[..., None, None]
    circle = dy * dy + dx * dx <= r * r
    half = r * 0.886  # a square of the circle's area
    square = (dy.abs() <= half) & (dx.abs() <= half)
    depth = (dy + r) / (1.8 * r)  # upward triangle: apex at -r, base at 0.8 r, widening downwards
    triangle = (depth >= 0) & (depth <= 1) & (dx.abs() <= depth * r * 1.05)
    ring = (dy * dy + dx * dx <= r * r) & (dy * dy + dx * dx >= (0.55 * r) ** 2)
    bar = 0.3 * r
    cross = ((dx.abs() <= bar) & (dy.abs() <= r)) | ((dy.abs() <= bar) & (dx.abs() <= r))
    kind = kind[..., None, None]
    out = torch.where(kind == 0, circle, square)
    out = torch.where(kind == 2, triangle, out)
    out = torch.where(kind == 3, ring, out)
    return torch.where(kind == 4, cross, out)


def make_shapes(
    n: int, *, seed: int, size: int = SIZE, distractors: tuple[int, int] = (3, 5)
) -> tuple[Tensor, Tensor, Tensor]:
    """Generate the task (vectorised; shapes sit in distinct cells of a 3 x 3 grid, so never overlap).

    Args:
        n: Number of images.
        seed: Seeds everything (the same seed gives the same images).
        size: Image side. Default: 64.
        distractors: Inclusive range of the number of distractor shapes, at most 8. Default: (3, 5).

    Returns:
        `(images, labels, boxes)`: images `(n, 3, size, size)` in [0, 1]; labels `(n,)`
        int64, the odd shape's kind (index into `KINDS`); boxes `(n, 4)` the odd shape's
        `(y0, x0, y1, x1)` pixel box.
    """
    if not 1 <= distractors[0] <= distractors[1] <= 8:
        raise ValueError(f"make_shapes expects 1 <= distractors[0] <= distractors[1] <= 8, got {distractors}")
    gen = torch.Generator().manual_seed(seed)
    slots = 1 + distractors[1]
    labels = torch.randint(len(KINDS), (n,), generator=gen)
    common = len(KINDS) + torch.randint(len(DISTRACTORS), (n, 1), generator=gen)
    kinds = torch.cat([labels[:, None], common.expand(n, slots - 1)], dim=1)  # (n, slots)
    count = torch.randint(distractors[0], distractors[1] + 1, (n, 1), generator=gen)
    present = torch.arange(slots)[None, :] <= count  # (n, slots); slot 0 (the odd shape) always
    cells = torch.rand(n, 9, generator=gen).argsort(-1)[:, :slots]  # (n, slots) distinct cells
    cell = size / 3
    r = (5.5 + 1.0 * torch.rand(n, slots, generator=gen)) * (size / SIZE)
    room = (cell / 2 - r - 1).clamp_min(0)
    cy = (cells // 3 + 0.5) * cell + (2 * torch.rand(n, slots, generator=gen) - 1) * room
    cx = (cells % 3 + 0.5) * cell + (2 * torch.rand(n, slots, generator=gen) - 1) * room
    colours = 0.5 + 0.5 * torch.rand(n, slots, 3, generator=gen)
    background = torch.rand(n, 3, 1, 1, generator=gen) * 0.25
    noise = 0.04 * torch.randn(n, 3, size, size, generator=gen)
    images = torch.empty(n, 3, size, size)
    for start in range(0, n, 256):
        part = slice(start, start + 256)
        masks = _shape_masks(kinds[part], cy[part], cx[part], r[part], size) & present[part, :, None, None]
        masks = masks.float()  # (b, slots, size, size)
        cover = masks.sum(1, keepdim=True)  # (b, 1, size, size)
        paint = torch.einsum("bshw,bsc->bchw", masks, colours[part])
        images[part] = ((background[part] + noise[part]) * (1 - cover) + paint).clamp(0, 1)
    boxes = torch.stack(
        [cy[:, 0] - r[:, 0], cx[:, 0] - r[:, 0], cy[:, 0] + r[:, 0] + 1, cx[:, 0] + r[:, 0] + 1], 1
    )
    return images, labels, boxes.long().clamp(0, size)


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _AvgMaxPool(nn.Module):
    """Global average and max pooling, concatenated: `(B, C, H, W) -> (B, 2C)`."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)


class OddShapeNet(nn.Module):
    """A small CNN: 64 -> 32 -> 16 (the attention runs here, 32 channels) -> 8, average and max
    pooled, an MLP head.

    Args:
        attention: A module for `(B, 32, 16, 16)` maps that keeps their shape, or None.
    """

    channels = 32
    grid = (16, 16)

    def __init__(self, attention: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 16, 2), _conv(16, self.channels, 2))
        self.attn = attention if attention is not None else nn.Identity()
        self.head = nn.Sequential(
            _conv(self.channels, 64, 2),
            _AvgMaxPool(),
            nn.Linear(128, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, len(KINDS)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(self.stem(x)))


@dataclass
class Result:
    """What one training run gave."""

    name: str
    accuracy: float
    seconds: float
    attention_params: int
    losses: list[float] = field(default_factory=list)


def train(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int = 32,
    lr: float = 5e-3,
    seed: int = 0,
    step: Callable[[], None] | None = None,
) -> list[float]:
    """Train with AdamW, warm-up and cosine decay; returns the mean loss per epoch.

    `step` is called after every batch (progress).
    """
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(steps // 10, 1)

    def schedule(i: int) -> float:  # linear warm-up, then cosine decay to zero
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (i - warm) / max(steps - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            x = images[idx]
            if bool(torch.rand(1, generator=gen) < 0.5):
                x = x.flip(-1)  # the labels do not depend on left/right
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
            if step is not None:
                step()
        losses.append(total / max(count, 1))
    return losses


def trained_net(spec: Spec, size: int, steps: int, seed: int = 0) -> OddShapeNet:
    """`OddShapeNet` with `spec`'s mechanism after `steps` AdamW steps (batch 16) on the demo task,
    its images resized to `size` pixels, in eval mode: what `attnzoo maps --train` draws.

    Raises:
        Unsupported: When the mechanism cannot run on the network's feature maps.
    """
    side = ((size + 1) // 2 + 1) // 2  # two stride-2 convolutions with padding 1
    torch.manual_seed(seed)
    net = OddShapeNet(build_nchw(spec, OddShapeNet.channels, (side, side), seed=seed))
    images, labels, _ = make_shapes(16 * steps, seed=seed)
    if size != SIZE:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    train(net, images, labels, epochs=1, batch_size=16, seed=seed)
    return net.eval()


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Accuracy on held-out images."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        correct += int(
            (model(images[start : start + batch_size]).argmax(-1) == labels[start : start + batch_size]).sum()
        )
    return correct / len(images)


def peak_on_odd_shape(heat: Tensor, box: Tensor, size: int = SIZE) -> tuple[bool, float]:
    """Whether a heat map's highest point (resized to the image) lies in the odd shape's box, and
    the box's share of the image (the chance that a random point does).
    """
    heat = F.interpolate(heat.float()[None, None], size=(size, size), mode="bilinear", align_corners=False)
    y, x = divmod(int(heat.argmax()), size)
    y0, x0, y1, x1 = box.tolist()
    return (y0 <= y < y1 and x0 <= x < x1), (y1 - y0) * (x1 - x0) / (size * size)


# ---------------------------------------------------------------------------------------------
# attnzoo demo


def _default_names() -> list[str]:
    registered = {s.name for s in list_modules()}
    names = [n for n in DEFAULT_ATTENTION if n in registered]
    return names or [s.name for s in list_modules() if s.layout == "NCHW"][:2]


def run(args: argparse.Namespace) -> int:
    """Run `attnzoo demo` with parsed arguments (see `attnzoo.cli.command.build_parser`)."""
    from attnzoo.maps.capture import capture_maps

    specs = resolve(args.attention) if args.attention else [get_spec(n) for n in _default_names()]
    for value, flag in (
        (args.epochs, "--epochs"),
        (args.train_size, "--train-size"),
        (args.test_size, "--test-size"),
        (args.batch_size, "--batch-size"),  # 0 divided by zero below; < 0 trained nothing, silently
    ):
        if value < 1:
            raise CLIError(f"{flag} expects a positive count, got {value}")
    if args.out:
        check_picture_path(args.out)
    attentions: list[tuple[str, nn.Module | None]] = [("none", None)]
    for spec in specs:
        try:
            attentions.append(
                (
                    spec.name,
                    build_nchw(spec, OddShapeNet.channels, OddShapeNet.grid, seed=args.seed),
                )
            )
        except Unsupported as err:
            raise CLIError(f"{spec.name} cannot run inside the demo's CNN: {err}") from None
    train_x, train_y, _ = make_shapes(args.train_size, seed=args.seed)
    test_x, test_y, test_boxes = make_shapes(args.test_size, seed=args.seed + 10_000)
    batches = (args.train_size + args.batch_size - 1) // args.batch_size
    progress = Progress(len(attentions) * args.epochs * batches, "demo training")
    # One throwaway step first: torch's one-time set-up (about 1 s) was counted in the first model's
    # training time, so the baseline read several times slower than the models with attention.
    train(OddShapeNet(None), train_x[:2], train_y[:2], epochs=1, batch_size=2, seed=args.seed)
    results, models = [], {}
    for label, attention in attentions:
        torch.manual_seed(args.seed)
        model = OddShapeNet(attention)
        start = time.perf_counter()
        losses = train(
            model,
            train_x,
            train_y,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            step=functools.partial(progress.advance, note=label),
        )
        seconds = time.perf_counter() - start
        accuracy = evaluate(model, test_x, test_y)
        params = 0 if attention is None else sum(p.numel() for p in attention.parameters())
        results.append(Result(label, accuracy, seconds, params, losses))
        models[label] = model
    progress.close()
    # Where the attention looks: the maps of the trained models over the test images.
    queries = [((i + 0.5) / 4, (j + 0.5) / 4) for i in range(4) for j in range(4)]
    count = min(args.test_size, 64)
    heats: dict[str, list[Tensor | None]] = {}
    for label, model in models.items():
        if label == "none":
            continue
        model.eval()
        with torch.no_grad(), capture_maps(model, queries=queries, token_grid=OddShapeNet.grid) as maps:
            model(test_x[:count])
        heats[label] = _first_heatmaps(maps, count)
    header = ("attention", "params", "test accuracy", "train s", "map peak on the odd shape")
    rows = []
    for r in results:
        peak = "-"
        if any(h is not None for h in heats.get(r.name, [])):
            maps_and_boxes = zip(heats[r.name], test_boxes[: len(heats[r.name])], strict=True)
            pairs = [peak_on_odd_shape(h, b) for h, b in maps_and_boxes if h is not None]
            hits = sum(p[0] for p in pairs)
            chance = sum(p[1] for p in pairs) / len(pairs)
            peak = f"{hits}/{len(pairs)} test images (by chance ~{chance:.0%})"
        rows.append((r.name, f"{r.attention_params:,}", f"{r.accuracy:.1%}", f"{r.seconds:.1f}", peak))
    print(
        f"odd-shape task: {args.train_size} training / {args.test_size} held-out images, "
        f"{plural(args.epochs, 'epoch')}, seed {args.seed}; chance {1 / len(KINDS):.1%}"
    )
    print(table(header, rows))
    shown = [(label, h[:8]) for label, h in heats.items() if any(x is not None for x in h)]
    if shown and args.out:
        try:
            from attnzoo.cli.plots import grid_figure

            grid_figure(
                list(test_x[:8]),
                shown,
                args.out,
                title="attention of the trained models (odd shape = circle, square or triangle)",
            )
            print(f"wrote {args.out}")
        except ImportError as err:
            print(f"no picture: {err}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _first_heatmaps(maps: dict[str, list[Any]], count: int) -> list[Tensor | None]:
    """Per image, a summary heat map (see `_plots.heatmap`): of the first spatial gate recorded,
    else of the first attention rows (the attention each position receives), else of the routing."""
    from attnzoo.cli.plots import heatmap

    for kind in ("spatial", "rows", "routing"):
        for records in maps.values():
            for m in records:
                if m.kind == kind and heatmap(m, OddShapeNet.grid) is not None:
                    return [heatmap(m, OddShapeNet.grid, sample=i) for i in range(count)]
    return [None] * count
