"""docs/compare.md is generated from the committed `attnzoo compare` result (tools/gen_compare)."""

from __future__ import annotations

import pytest
from tools import gen_compare


def test_the_page_matches_the_committed_result() -> None:
    data = gen_compare.load()
    page = gen_compare.PAGE.read_text()
    assert gen_compare.render(page, data) == page, "docs/compare.md is stale: run python -m tools.gen_compare"
    assert gen_compare.IMAGE.exists() and gen_compare.IMAGE.stat().st_size > 20_000
    assert "(images/compare.png)" in page


def test_the_committed_result_has_the_baseline_and_reasons() -> None:
    rows = gen_compare.load()["results"]
    assert rows[0]["name"] == "none" and rows[0]["status"] == "ok"
    for row in rows:
        if row["status"] == "ok":
            assert row["latency_ms"] > 0 and row["peak_train_mb"] > 0 and 0 <= row["accuracy"] <= 1
        else:
            assert row["reason"], row


def test_a_page_without_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="compare-setup"):
        gen_compare.render("# no markers\n", gen_compare.load())
