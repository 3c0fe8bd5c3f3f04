"""ACmix: attnzoo's ACmix against a plain reference that follows the official algorithm step by step.

The reference unfolds every ``kernel_att x kernel_att`` neighbourhood of keys, values and position
encodings (as LeapLabTHU/ACmix's ``test_bottleneck.py`` does) and applies ``fc`` then ``dep_conv``.
Both share one state_dict. Run: ``PYTHONPATH=src python benchmarks/bench_acmix.py``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.cli.harness import (
    alternate,
    ensure_malloc_env,
    forward_step,
    markdown_table,
    peak_memory,
    train_step,
)
from attnzoo.mechanisms.acmix import ACmix

# (name, constructor kwargs, input shape); the first is the target.
CASES = [
    ("ACmix(64, 64), stride 1", dict(channels=64, out_channels=64), (2, 64, 56, 56)),
    ("ACmix(64, 64), stride 2", dict(channels=64, out_channels=64, stride=2), (2, 64, 56, 56)),
    ("ACmix(128, 128, num_heads=8)", dict(channels=128, out_channels=128, num_heads=8), (4, 128, 28, 28)),
]


class OfficialStepByStep(nn.Module):
    """The official forward, step by step (reflection pad + unfold of k, v and pe; fc, permute, dep_conv)."""

    def __init__(self, source: ACmix) -> None:
        super().__init__()
        self.m = source

    def forward(self, x: Tensor) -> Tensor:
        m = self.m
        q, k, v = m.conv1(x), m.conv2(x), m.conv3(x)
        b, c, h, w = q.shape
        s, ka, head, hd = m.stride, m.kernel_att, m.num_heads, m.head_dim
        ho, wo = h // s, w // s
        loc_w = torch.linspace(-1.0, 1.0, w, dtype=x.dtype).unsqueeze(0).repeat(h, 1)
        loc_h = torch.linspace(-1.0, 1.0, h, dtype=x.dtype).unsqueeze(1).repeat(1, w)
        pe = m.conv_p(torch.cat([loc_w.unsqueeze(0), loc_h.unsqueeze(0)], 0).unsqueeze(0))
        q_att = q.view(b * head, hd, h, w) * hd**-0.5
        k_att, v_att = k.view(b * head, hd, h, w), v.view(b * head, hd, h, w)
        q_att, q_pe = q_att[:, :, ::s, ::s], pe[:, :, ::s, ::s]
        pad = ka // 2

        def unfold(t: Tensor) -> Tensor:
            return F.unfold(F.pad(t, (pad,) * 4, mode="reflect"), ka, stride=s).view(
                t.shape[0], hd, ka * ka, ho, wo
            )

        att = (q_att.unsqueeze(2) * (unfold(k_att) + q_pe.unsqueeze(2) - unfold(pe))).sum(1).softmax(1)
        out_att = (att.unsqueeze(1) * unfold(v_att)).sum(2).view(b, c, ho, wo)
        f_all = m.fc(torch.cat([t.view(b, head, hd, h * w) for t in (q, k, v)], 1))
        f_conv = f_all.permute(0, 2, 1, 3).reshape(b, -1, h, w)
        return m.rate1 * out_att + m.rate2 * m.dep_conv(f_conv)


def build(case: int, which: str, train: bool = True):
    """A zero-argument step (forward+backward, or forward only) for ``peak_memory`` and timing."""
    _, kwargs, shape = CASES[case]
    torch.manual_seed(0)
    ours = ACmix(**kwargs)
    module = ours if which == "attnzoo" else OfficialStepByStep(ours)
    x = torch.randn(shape)
    return train_step(module, [x]) if train else forward_step(module, [x])


def useful_flops(kwargs: dict, shape: tuple[int, ...]) -> float:
    """Forward FLOPs of the algorithm itself (multiply-add = 2), the same numerator for both sides."""
    b, cin, h, w = shape
    cout, head, ka, s, kc = (
        kwargs["out_channels"],
        kwargs.get("num_heads", 4),
        kwargs.get("kernel_att", 7),
        kwargs.get("stride", 1),
        kwargs.get("kernel_conv", 3),
    )
    ho, wo = -(-h // s), -(-w // s)
    qkv = 2 * 3 * cin * cout * h * w
    attention = 2 * 2 * cout * ka * ka * ho * wo  # q.k and weights.v over every neighbour
    conv = 2 * (kc * kc * 3 * head * (cout // head) * h * w + cout * kc * kc * kc * kc * ho * wo)
    return float(b * (qkv + attention + conv))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=9, help="alternating timing rounds per case")
    args = parser.parse_args()
    ensure_malloc_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for i, (name, kwargs, shape) in enumerate(CASES):
        t0 = time.perf_counter()
        train = alternate({w: build(i, w) for w in ("reference", "attnzoo")}, rounds=args.rounds, warmup=2)
        infer = alternate(
            {w: build(i, w, train=False) for w in ("reference", "attnzoo")}, rounds=args.rounds, warmup=2
        )
        mem = {
            w: peak_memory("benchmarks.bench_acmix:build", {"case": i, "which": w})
            for w in ("reference", "attnzoo")
        }
        flops = 3 * useful_flops(kwargs, shape)  # forward + backward ~ 3x forward
        rows.append(
            [
                name,
                "x".join(map(str, shape)),
                f"{train.median('reference') * 1e3:.1f}",
                f"{train.median('attnzoo') * 1e3:.1f}",
                f"{1 / train.ratio('attnzoo', 'reference'):.2f}x",
                f"{infer.median('reference') * 1e3:.1f} / {infer.median('attnzoo') * 1e3:.1f}",
                f"{1 / infer.ratio('attnzoo', 'reference'):.2f}x",
                f"{mem['reference'] / 2**20:.0f}",
                f"{mem['attnzoo'] / 2**20:.0f}",
                f"{mem['attnzoo'] / max(mem['reference'], 1):.2f}",
                " / ".join(f"{flops / train.median(w) / 1e9:.1f}" for w in ("reference", "attnzoo")),
            ]
        )
        print(f"{name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    print("## ACmix (issue 7)\n")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32. Reference: the official "
        "algorithm step by step (unfold of k, v, pe; fc then dep_conv), same weights.\n"
    )
    print(
        markdown_table(
            [
                "case",
                "input",
                "ref fwd+bwd ms",
                "attnzoo fwd+bwd ms",
                "speed-up (fwd+bwd)",
                "fwd only ms (ref / ours)",
                "speed-up (fwd)",
                "ref peak MB",
                "attnzoo peak MB",
                "memory ratio",
                "GFLOP/s (ref / ours)",
            ],
            rows,
        )
    )
    print(
        "\nSpeed-up: median over alternating rounds of reference time / attnzoo time. Peak: extra resident "
        "memory of one forward+backward step in a fresh process. GFLOP/s: the algorithm's useful FLOPs "
        "(convolutions, q.k and weights.v over the neighbourhoods; backward counted as 2x forward) per "
        "second."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
