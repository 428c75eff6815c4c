"""Record damaged-image cases where our reader once disagreed with the kernel (tests/data/oracle/mutants/).

Not a test.  Usage (root, host kernel with erofs):

    python -m tests.oracle.make_mutants BASE_NAME BASE_IMAGE SEED:INDEX [SEED:INDEX ...]

Stores ``BASE_NAME.erofs.gz`` once, the kernel's scan of the base, and per mutant the
byte patches (replayed from ``mutants.mutations(base, SEED, ...)``) with the kernel's
scan of the mutant as a delta against the base scan, in ``BASE_NAME.json.gz``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tests.oracle import mutants

OUT = Path(__file__).resolve().parents[1] / "data" / "oracle" / "mutants"


def main(name: str, base_path: str, picks: list[str]) -> int:
    orig = Path(base_path).read_bytes()
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="oracle-mut-"))
    try:
        base_scan = mutants.kernel_scan(Path(base_path), work / "mnt")
        assert isinstance(base_scan, dict), base_scan
        cases = []
        for pick in picks:
            seed, index = (int(x) for x in pick.split(":"))
            patches = next(p for i, p in mutants.mutations(orig, seed, index + 1) if i == index)
            img = work / "m.erofs"
            img.write_bytes(mutants.apply(orig, patches))
            scan = mutants.kernel_scan(img, work / "mnt")
            cases.append({"seed": seed, "index": index, "patches": patches,
                          "kernel": mutants.delta(base_scan, scan)})
            print(f"{pick}: {len(mutants.compare(scan, mutants.our_scan(img.read_bytes())))} disagreements now")
        with open(base_path, "rb") as i, gzip.GzipFile(OUT / f"{name}.erofs.gz", "wb", 9, mtime=0) as o:
            shutil.copyfileobj(i, o)
        with gzip.GzipFile(OUT / f"{name}.json.gz", "wb", 9, mtime=0) as o:
            o.write(json.dumps({"base": f"{name}.erofs.gz", "kernel_release": os.uname().release,
                                "base_scan": base_scan, "cases": cases}, sort_keys=True).encode())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
