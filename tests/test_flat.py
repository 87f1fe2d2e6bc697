"""Flat memory at any N (flat.py): duplicate ids and reused addresses past the
spill to disk, latency percentiles from a fixed-size histogram."""

from __future__ import annotations

import math
import random
import tempfile
import tracemalloc
from pathlib import Path

import pytest

from emailpers.flat import FirstSeen, Histogram, Sketch

from conftest import manifest_lines, render, report, write_campaign


def nearest_rank(values: list[float], q: float) -> float:
    return sorted(values)[max(1, math.ceil(q / 100 * len(values))) - 1]


def test_percentiles_are_exact_for_few_values_and_within_the_stated_error_for_many() -> None:
    rng = random.Random(7)
    few = [rng.lognormvariate(4, 0.6) for _ in range(Histogram.EXACT)]
    many = few + [rng.lognormvariate(4, 0.6) for _ in range(200_000)] + [0.001, 90_000.0]
    small, large = Histogram.of(few), Histogram.of(many)

    for q in (50, 95, 99):
        assert small.percentile(q) == nearest_rank(few, q)
        exact = nearest_rank(many, q)
        assert abs(large.percentile(q) - exact) <= Histogram.ERROR * exact  # type: ignore[operator]
    assert (large.max, large.min, len(large)) == (90_000.0, 0.001, len(many))
    assert large.exact is None and len(large.counts) == Histogram.BUCKETS


def test_first_seen_answers_the_same_before_and_after_the_spill() -> None:
    rng = random.Random(3)
    keys = [(f"id-{rng.randrange(400)}", f"v{n}") for n in range(1000)]
    expected: dict[str, str] = {}
    with FirstSeen(spill_at=50) as seen:
        for key, value in keys:
            assert seen.first(key, value) == expected.get(key)
            expected.setdefault(key, value)
        assert seen.spilled


def test_first_seen_stays_flat_in_memory_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = FirstSeen(spill_at=1000)
    tracemalloc.start()
    try:
        for n in range(100_000):
            seen.first(f"recipient-{n:09d}")
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen.first("recipient-000000007") == ""
    assert held < 1_000_000  # a set of these ids holds ~9 MB
    seen.close()
    assert list(tmp_path.iterdir()) == []


def test_duplicate_ids_and_reused_addresses_are_found_past_the_spill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FirstSeen, "SPILL_AT", 2)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    text = (
        "id,email,first_name\n"
        "r1,ann@example.com,Ann\n"
        "r2,b@example.com,B\n"
        "r3,c@example.com,C\n"
        "r4,ANN@Example.com,Ann\n"  # past the spill: the address of r1 under another id
        "r1,ann@example.com,Ann\n"  # past the spill: a duplicate id
        "r5,e@example.com,E\n"
    )
    campaign = write_campaign(tmp_path / "c", recipients=text, recipients_file="recipients.csv")
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    (warning,) = report(out)["warnings"]
    assert warning.startswith("1 row reuses the address of an earlier row") and "ANN@Example.com (id 'r4')" in warning
    invalid = [(e["row"], e["error"]) for e in manifest_lines(out) if e["status"] == "invalid"]
    assert invalid == [(6, "duplicate id 'r1' (first seen earlier in the file)")]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_resume_past_the_spill_skips_exactly_the_recipients_already_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ids a resumed run skips (manifest.Done) are held like the duplicate
    ids: in memory up to SPILL_AT, then on disk, so a resume of a million-line
    manifest does not hold a million ids."""
    monkeypatch.setattr(FirstSeen, "SPILL_AT", 3)
    rows = [{"id": f"r{n}", "email": f"r{n}@example.com", "first_name": "A"} for n in range(10)]
    campaign = write_campaign(tmp_path / "c", recipients=rows[:6])
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 0
    campaign = write_campaign(tmp_path / "c", recipients=rows)  # four more, same campaign and templates

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    ids = [e["id"] for e in manifest_lines(out)]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # the six once, the four new once


def test_the_sketch_never_forgets_a_key_and_stays_one_mebibyte() -> None:
    tracemalloc.start()
    try:
        sketch = Sketch()
        keys = [f"GET https://api.example/v1/users/{n}/cart" for n in range(100_000)]
        for key in keys:
            sketch.add(key)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(key in sketch for key in keys)
    false = sum(f"GET https://api.example/v1/users/{n}/profile" in sketch for n in range(100_000))
    assert false < 100  # ~0.03% expected at 100,000 keys
    assert held < Sketch.BITS // 8 + 200_000 + len(keys) * 120  # the bits, plus the keys list itself
