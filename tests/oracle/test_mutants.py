"""Damaged images: every path gives what the kernel gives (the same value, or the same errno).

* recorded cases (tests/data/oracle/mutants, made by make_mutants.py): mutants on which our
  reader once disagreed with the host kernel, with the kernel's answers; run everywhere;
* the same cases live, and a bounded seeded differential fuzz, where the host kernel can mount.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.oracle import kmount, mutants

DATA = Path(__file__).resolve().parents[1] / "data" / "oracle" / "mutants"
BASES = sorted(DATA.glob("*.json.gz")) if DATA.exists() else []


def _meta(path: Path) -> dict:
    with gzip.open(path) as f:
        return json.load(f)


CASES = [(b, c) for b in BASES for c in _meta(b)["cases"]]
FUZZ_SEEDS = (101, 102, 103)
FUZZ_COUNT = 25


def _base(meta_path: Path) -> tuple[dict, bytes]:
    meta = _meta(meta_path)
    with gzip.open(DATA / meta["base"]) as f:
        return meta, f.read()


@pytest.mark.parametrize("base,case", CASES, ids=[f"{b.name.split('.')[0]}-{c['seed']}:{c['index']}" for b, c in CASES])
def test_recorded_mutant_matches_kernel(base, case):
    meta, orig = _base(base)
    kernel = mutants.undelta(meta["base_scan"], case["kernel"])
    ours = mutants.our_scan(mutants.apply(orig, case["patches"]))
    bad = mutants.compare(kernel, ours)
    assert not bad, bad[:8]


@pytest.mark.parametrize("base,case", CASES, ids=[f"{b.name.split('.')[0]}-{c['seed']}:{c['index']}" for b, c in CASES])
def test_recorded_mutant_live(base, case, tmp_path):
    reason = kmount.kernel_unavailable_reason()
    if reason:
        pytest.skip(reason)
    meta, orig = _base(base)
    image = tmp_path / "m.erofs"
    image.write_bytes(mutants.apply(orig, case["patches"]))
    bad = mutants.compare(mutants.kernel_scan(image, tmp_path / "mnt"), mutants.our_scan(image.read_bytes()))
    assert not bad, bad[:8]


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
@pytest.mark.parametrize("base", BASES, ids=[b.name.split(".")[0] for b in BASES])
def test_differential_fuzz(base, seed, tmp_path):
    """Seeded byte mutants of the base image: ours and the kernel agree path by path (bounded count)."""
    reason = kmount.kernel_unavailable_reason()
    if reason:
        pytest.skip(reason)
    _, orig = _base(base)
    image = tmp_path / "m.erofs"
    failures = []
    for i, patches in mutants.mutations(orig, seed, FUZZ_COUNT):
        image.write_bytes(mutants.apply(orig, patches))
        bad = mutants.compare(mutants.kernel_scan(image, tmp_path / "mnt"), mutants.our_scan(image.read_bytes()))
        if bad:
            failures.append(f"{seed}:{i} {patches}: {bad[:3]}")
    assert not failures, failures[:5]
