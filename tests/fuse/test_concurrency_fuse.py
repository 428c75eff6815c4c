"""16 parallel readers over one mount: random reads, whole-file reads and directory walks, every byte checked.

Bounded: each image runs for DURATION seconds of wall time (and at most MAX_OPS operations per
reader); no timing is asserted.  The oracle is the source tree (tree.tar), restricted to files
whose kernel-manifest sha256 equals the source's.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import threading
import time

import pytest

from tests import corpuslib

from .conftest import find_pids, is_live, mount_corpus, peak_rss_mb

READERS = 16
DURATION = 10.0
MAX_OPS = 200_000


@pytest.mark.parametrize("name", ["plain-inline-4k", "lz4hc-pcluster-64k"])
def test_sixteen_readers(name, fuse):
    entries, files, mnt = mount_corpus(fuse, name)
    dirs = [p for p, r in entries.items() if r.get("type") == "dir"]
    assert len(files) > 1000
    (pid,) = find_pids(mnt)

    errors: list[str] = []
    counts = [0] * READERS
    deadline = time.monotonic() + DURATION

    def reader(idx: int) -> None:
        rng = random.Random(idx)
        try:
            for _ in range(MAX_OPS):
                if time.monotonic() > deadline or len(errors) > 20:
                    return
                roll = rng.random()
                if roll < 0.65:
                    path = rng.choice(files)
                    size = entries[path]["size"]
                    off = rng.randrange(0, max(size, 1))
                    n = rng.choice([1, 100, 4095, 4096, 8193, 65536, 200_000, 1 << 20])
                    with open(mnt + path, "rb", buffering=0) as f:
                        got = os.pread(f.fileno(), n, off)
                    if got != corpuslib.source_bytes(path, off, n):
                        errors.append(f"{path} [{off}:+{n}]: wrong bytes")
                elif roll < 0.85:
                    path = rng.choice(files)
                    with open(mnt + path, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                    if digest != entries[path]["sha256"]:
                        errors.append(f"{path}: wrong content")
                else:
                    top = rng.choice(dirs)
                    for _walk in range(50):  # a bounded walk down from a random directory
                        want = entries[top]
                        names = os.listdir(mnt + top)
                        if sorted(names) != sorted(want["children"]):
                            errors.append(f"{top}: wrong listing")
                            break
                        base = top.rstrip("/") + "/"
                        for child in names:
                            st = os.lstat(mnt + base + child)
                            rec = entries[base + child]
                            if f"{st.st_mode:o}" != rec["mode"] or (
                                    not stat.S_ISDIR(st.st_mode) and st.st_size != rec["size"]):
                                errors.append(f"{base + child}: wrong attributes")
                        subdirs = [c for c in names if entries[base + c].get("type") == "dir"]
                        if not subdirs:
                            break
                        top = base + rng.choice(subdirs)
                counts[idx] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"reader {idx}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DURATION + 120)
    assert not any(t.is_alive() for t in threads), "a reader hung"
    assert not errors, errors[:10]
    assert all(c > 0 for c in counts), counts
    assert find_pids(mnt) == [pid] and is_live(mnt)
    assert peak_rss_mb(pid) < 200
