"""Generate the "Which attention should I use?" page from a committed `attnzoo compare` result.

`python -m tools.gen_compare` reads `docs/data/compare.json` (written by
`attnzoo compare --json docs/data/compare.json`), rewrites the generated parts of
`docs/compare.md` (the run's setup, the table, the mechanisms that were not measured, a few
observations) and draws `docs/images/compare.png`. A test fails when the page is stale.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from attnzoo.cli.compare import BASELINE, cells, ordered, title
from attnzoo.cli.harness import markdown_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "data" / "compare.json"
PAGE = ROOT / "docs" / "compare.md"
IMAGE = ROOT / "docs" / "images" / "compare.png"
MARKERS = ("setup", "table", "notes")

HEADER = (
    "mechanism",
    "attention params",
    "model params",
    "FLOPs / image",
    "attention FLOPs / image",
    "latency (ms / batch)",
    "latency (× none)",
    "training-step peak (MiB)",
    "held-out accuracy",
)


def load(path: Path = DATA) -> dict[str, Any]:
    """The committed `attnzoo compare` JSON."""
    return json.loads(path.read_text())


def setup(data: dict[str, Any]) -> str:
    """Where and how the committed result was measured."""
    m, cfg = data["machine"], data["config"]
    vector = ", ".join(name for name, key in (("AVX2", "avx2"), ("AVX-512", "avx512")) if m[key]) or "neither"
    minutes = data["seconds"] / 60
    return "\n".join(
        [
            f"- **Machine**: {m['cpu']} (`model name` in /proc/cpuinfo), {m.get('cores', '?')} cores, "
            f"vector extensions: {vector}; {m['threads']} torch thread{'s' if m['threads'] > 1 else ''}, "
            f"torch {m['torch']}, Python {m['python']}; measured {m['date']}.",
            f"- **Run**: `OMP_NUM_THREADS={m['threads']} attnzoo compare --json docs/data/compare.json` "
            "with the defaults: "
            f"{cfg['train_size']} training and {cfg['test_size']} held-out images, {cfg['epochs']} epochs, "
            f"batch {cfg['batch']}, {cfg['rounds']} latency rounds, seed {cfg['seed']}.",
            f"- **Time**: {data['seconds']:.0f} s wall clock ({minutes:.1f} minutes) for everything, on a "
            f"machine shared with other jobs (CPU time of the main process: {data['cpu_seconds']:.0f} s).",
        ]
    )


def results_table(data: dict[str, Any]) -> str:
    """The Markdown table: baseline first, then by held-out accuracy, best first."""
    done, _ = ordered(data["results"])
    rows = []
    for r in done:
        row = list(cells(r))
        row[0] = f"**{r['name']}** (baseline)" if r["name"] == BASELINE else f"`{r['name']}`"
        rows.append(row)
    return markdown_table(HEADER, rows)


def notes(data: dict[str, Any]) -> str:
    """The mechanisms that were not measured (with the reason), then a few observations."""
    done, others = ordered(data["results"])
    lines = []
    if others:
        lines.append("Not measured (they cannot run on a 32-channel 16 x 16 feature map):")
        lines.append("")
        lines += [f"- `{r['name']}`: {r['reason']}" for r in others]
        lines.append("")
    base = next(r for r in done if r["name"] == BASELINE)
    rest = [r for r in done if r["name"] != BASELINE]
    n = data["config"]["test_size"]
    p = base["accuracy"]
    noise = 2 * math.sqrt(2 * p * (1 - p) / n)  # two standard errors of a difference of two accuracies
    better = [r for r in rest if r["accuracy"] - p > noise]
    cheap = [r for r in rest if r["latency_ratio"] <= 1.5]
    lines.append("In this run:")
    lines.append("")
    lines.append(
        f"- The baseline reaches {p:.1%}. With {n} held-out images, two standard errors of the "
        f"difference between two accuracies are about {100 * noise:.1f} percentage points: smaller "
        "gaps are noise."
    )
    if better:
        names = ", ".join(
            f"`{r['name']}` ({r['accuracy']:.1%}, {r['latency_ratio']:.2f}× latency)" for r in better
        )
        lines.append(f"- Clearly above the baseline: {names}.")
    else:
        lines.append("- No mechanism is clearly above the baseline at this training budget.")
    if cheap:
        best = max(cheap, key=lambda r: r["accuracy"])
        lines.append(
            f"- Best accuracy within 1.5× the baseline's latency: `{best['name']}` "
            f"({best['accuracy']:.1%}, {best['latency_ratio']:.2f}×)."
        )
    top = max(rest, key=lambda r: r["accuracy"])
    lines.append(
        f"- Best accuracy overall: `{top['name']}` ({top['accuracy']:.1%}, {top['latency_ratio']:.2f}×)."
    )
    slow = max(rest, key=lambda r: r["latency_ratio"])
    lines.append(f"- Slowest: `{slow['name']}` ({slow['latency_ratio']:.1f}× the baseline's latency).")
    return "\n".join(lines)


def render(page: str, data: dict[str, Any]) -> str:
    """`page` with every generated part replaced."""
    parts = {"setup": setup(data), "table": results_table(data), "notes": notes(data)}
    for key in MARKERS:
        start, end = f"<!-- compare-{key}:start -->", f"<!-- compare-{key}:end -->"
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        if not pattern.search(page):
            raise ValueError(f"{PAGE.name} lacks the markers {start} ... {end}")
        page = pattern.sub(lambda _m, s=start, e=end, k=key: f"{s}\n{parts[k]}\n{e}", page)
    return page


def main() -> int:
    """Rewrite docs/compare.md and docs/images/compare.png from docs/data/compare.json."""
    from attnzoo.cli.compare_chart import compare_chart

    data = load()
    PAGE.write_text(render(PAGE.read_text(), data))
    compare_chart(data["results"], IMAGE, title=title(data))
    print(f"wrote {PAGE.relative_to(ROOT)} and {IMAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
