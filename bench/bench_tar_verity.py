"""Verified reads of registry tar layers (issue 22): what checking every lazy read of the blob against
the dm-verity tree its indexing pass made (verity/blobtree.py, verity/anchored.py) costs.  Figures,
not pass/fail; each ratio is verified / unverified (``verity=off``), both measured in the same run,
alternating.

The layers: bench_tarlayer's tar.gz (built once into bench/work/tarlayer/: /usr/share/doc,
/usr/lib/python3* and a 100 MiB semi-compressible file) and the same tar uncompressed.  Parts:

    pass    the indexing pass in-process (``index_layer`` over the local file, its sha256 digest
            checked) with the blob's tree (``tree=True``) and without; page cache warm; medians
    read    a docker-registry on 127.0.0.1 (no added latency); ``erofs-mount --mode fuse`` with the
            tar index cached and the blob's bytes not (the cache entry's data/map removed before each
            mount), caches dropped: a cold sequential read of the 100 MiB file (1 MiB reads), and
            reading every file of the layer; the daemon's CPU seconds beside each time

    python -m bench tar_verity     (or: python -m bench.bench_tar_verity [--rounds 5] [--only pass,read])
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_tarlayer import (BIG, LAYER, LAYER_MT, WORK, _cli, _cpu, _daemons, _drop_caches,  # noqa: E402
                                  _env, _med, _push, _read_all, _unmount, build_layer)

MiB = 1 << 20
MB = 1e6
PLAIN = WORK / "layer.tar"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
PARTS = ("pass", "read")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def plain_layer() -> Path:
    if not PLAIN.exists():
        tmp = PLAIN.with_suffix(".tmp")
        with gzip.open(LAYER, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 * MiB)
        os.rename(tmp, PLAIN)
    return PLAIN


# ---------------------------------------------------------------------------------- 1. the pass
def part_pass(rounds: int, layers: dict, rows: list[str]) -> None:
    import trio

    from erofs_mount.sources.local import LocalSource
    from erofs_mount.sources.tarlayer.build import index_layer

    async def once(path: Path, kind: str, digest: str, tree: bool) -> float:
        src = LocalSource.open(str(path))
        try:
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(open(os.devnull, "w")):
                await index_layer(src, kind, what=path.name, digest=digest, tree=tree)
            return time.perf_counter() - t0
        finally:
            await src.aclose()

    rows.append(f"1 pass   index_layer over the local file (digest checked), page cache warm, median of {rounds}")
    for kind, (path, digest, _mt) in layers.items():
        with open(path, "rb") as f:       # warm
            while f.read(8 * MiB):
                pass
        times = {False: [], True: []}
        for _ in range(rounds):
            for tree in (False, True):
                times[tree].append(trio.run(once, path, kind, digest, tree))
        off, on = _med(times[False]), _med(times[True])
        rows.append(f"  {kind:<5} {path.stat().st_size / MB:7.1f} MB  without tree {off:6.2f} s  with tree {on:6.2f} s"
                    f"  ratio {on / off:.2f}")


# ---------------------------------------------------------------------------------- 2. reads
def _read_every_file(root: Path) -> int:
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb", buffering=0) as f:
                while chunk := f.read(MiB):
                    n += len(chunk)
    return n


def _mount_and(ref: str, mnt: Path, cache: Path, digest: str, verify: bool, work: str) -> tuple[float, float, int]:
    entry = cache / "sha256" / digest.split(":", 1)[1]
    for name in ("data", "map", "verified"):   # the index stays cached; the blob's bytes do not
        with contextlib.suppress(FileNotFoundError):
            (entry / name).unlink()
    _drop_caches()
    opts = f"oci.layer=0,oci.insecure,oci.cache={cache}" + ("" if verify else ",verity=off")
    res = _cli("--mode", "fuse", "-o", opts, ref, str(mnt), env=_env())
    if res.returncode != 0:
        raise RuntimeError(f"erofs-mount failed: {res.stderr.strip()[-2000:]}")
    try:
        pids = _daemons(mnt)
        c0 = _cpu(pids)
        t0 = time.perf_counter()
        n = _read_all(mnt / BIG)[0] if work == "big" else _read_every_file(mnt)
        return time.perf_counter() - t0, _cpu(pids) - c0, n
    finally:
        _unmount(mnt)


def part_read(rounds: int, layers: dict, tmp: Path, rows: list[str]) -> None:
    from tests.oci._servers import REGISTRY_BIN, start_registry

    if REGISTRY_BIN is None:
        rows.append("2 read   skipped: no docker-registry (apt-get install docker-registry)")
        return
    reg = start_registry(tmp / "registry", WORK / "storage")
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    try:
        rows.append(f"2 read   FUSE from a local docker-registry, index cached, blob bytes not, caches dropped, "
                    f"median of {rounds} (daemon CPU s)")
        for kind, (path, digest, mt) in layers.items():
            repo = _push(reg.url, path, digest, media_type=mt, repo=f"bench/tarverity-{kind}")
            ref = f"{reg.host}/{repo}:v1"
            cache = tmp / f"cache-{kind}"
            _mount_and(ref, mnt, cache, digest, True, "big")     # makes the index (and its tree)
            for work in ("big", "all"):
                res = {False: [], True: []}
                for _ in range(rounds):
                    for verify in (False, True):
                        res[verify].append(_mount_and(ref, mnt, cache, digest, verify, work))
                off, on = _med(r[0] for r in res[False]), _med(r[0] for r in res[True])
                coff, con = _med(r[1] for r in res[False]), _med(r[1] for r in res[True])
                n = res[True][0][2]
                what = f"/{BIG} ({n / MiB:.0f} MiB)" if work == "big" else f"every file ({n / MiB:.0f} MiB)"
                rows.append(f"  {kind:<5} {what:<36} off {off:6.2f} s ({coff:5.2f})  verified {on:6.2f} s "
                            f"({con:5.2f})  ratio {on / off:.2f}")
    finally:
        if os.path.ismount(mnt):
            _unmount(mnt)
        reg.stop()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_tar_verity")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ",".join(PARTS))
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("gzip") is None:
        print("bench_tar_verity skipped: needs root (drop_caches), /dev/fuse, gzip, tar")
        return 0
    t_start = time.monotonic()
    build_layer()
    plain = plain_layer()
    layers = {"gzip": (LAYER, _sha256_file(LAYER), LAYER_MT), "tar": (plain, _sha256_file(plain), OCI_TAR)}
    rows: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    try:
        if "pass" in parts:
            part_pass(args.rounds, layers, rows)
        if "read" in parts:
            part_read(args.rounds, layers, tmp, rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"tar layers: {LAYER.name} {LAYER.stat().st_size / MB:.1f} MB, {plain.name} {plain.stat().st_size / MB:.1f} MB; "
          f"load {os.getloadavg()[0]:.2f}; {time.monotonic() - t_start:.0f} s in all")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
