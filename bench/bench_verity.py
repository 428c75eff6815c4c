"""Verified reads (issue 22): the cost of checking every block against a dm-verity tree.

    python -m bench verity     (or: python -m bench.bench_verity [--runs 5] [--only uncompressed,lz4hc])

The images are bench_fuse's (``/usr/lib/python3*``, man, include + the largest ELF as big.bin), one
copy of each with its tree appended by ``erofs-mount verity-format`` (bench/work/verity/).  For FUSE
and for fanotify (an empty sparse file each run), with and without ``-o verity.roothash=``, the
targets taking turns in every run, page/dentry/inode caches dropped before each measurement:

    big      read big.bin sequentially (1 MiB reads; 20-160 MB)
    readall  read every regular file

Printed: medians, and verified/unverified (time ratio: 1.10 = 10 % slower with verification).
The same image file serves both rows (the tree after the image changes nothing for an unverified
mount), so the only difference is the check.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from bench import bench_fuse as bf

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work", "verity")
PY = sys.executable


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "erofs_mount", *args], cwd=bf.REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def prepare(only: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """compression -> (image with its tree, root hash)."""
    images, missing = bf.prepare(os.path.join(HERE, "work", "fuse"), only)
    os.makedirs(WORK, exist_ok=True)
    out = {}
    for comp in only:
        if comp in missing:
            print(f"{comp}: skipped: {missing[comp]}")
            continue
        src = images[f"erofs-{comp}"]
        dst = os.path.join(WORK, os.path.basename(src))
        root_file = dst + ".root"
        if not (os.path.exists(dst) and os.path.exists(root_file)
                and os.path.getmtime(dst) >= os.path.getmtime(src)):
            shutil.copyfile(src, dst)
            res = _cli("verity-format", "--force", dst)
            if res.returncode:
                raise SystemExit(res.stderr)
            root = next(ln.split()[-1] for ln in res.stdout.splitlines() if ln.startswith("root hash:"))
            with open(root_file, "w") as f:
                f.write(root)
        with open(root_file) as f:
            out[comp] = (dst, f.read().strip())
    return out


def measure(mode: str, image: str, opts: list[str], workload: str, mnt: str) -> float:
    env = None
    cache = os.path.join(WORK, "fanotify-cache")
    if mode == "fanotify":
        shutil.rmtree(cache, ignore_errors=True)   # an empty sparse file every run
        os.makedirs(cache)
        env = {"EROFS_MOUNT_CACHE_DIR": cache}
    os.makedirs(mnt, exist_ok=True)
    res = _cli("--mode", mode, *(("-o", ",".join(opts)) if opts else ()), image, mnt, env=env)
    if res.returncode:
        raise RuntimeError(res.stderr.strip())
    try:
        bf.drop_caches()
        t = time.perf_counter()
        bf.WORKLOADS[workload](mnt)
        return time.perf_counter() - t
    finally:
        for _ in range(20):
            if _cli("-u", mnt, env=env).returncode == 0:
                break
            time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench verity")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="uncompressed,lz4hc")
    ap.add_argument("--modes", default="fuse,fanotify")
    ap.add_argument("--workloads", default="big,readall")
    a = ap.parse_args(argv or [])
    if os.geteuid() != 0:
        print("bench verity: needs root (mounts, drop_caches)")
        return 0
    only = tuple(a.only.split(","))
    images = prepare(only)
    mnt = os.path.join(WORK, "mnt")
    print(f"{'image':13} {'mode':9} {'workload':8} {'plain s':>8} {'verified s':>10} {'verified/plain':>15}")
    for comp in images:
        image, root = images[comp]
        for mode in a.modes.split(","):
            for workload in a.workloads.split(","):
                times: dict[str, list[float]] = {"plain": [], "verified": []}
                try:
                    for _ in range(a.runs):   # the two take turns: drift hits both alike
                        times["plain"].append(measure(mode, image, [], workload, mnt))
                        times["verified"].append(measure(mode, image, [f"verity.roothash={root}"], workload, mnt))
                except RuntimeError as exc:
                    print(f"{comp:13} {mode:9} {workload:8} skipped: {exc}")
                    continue
                p, v = statistics.median(times["plain"]), statistics.median(times["verified"])
                print(f"{comp:13} {mode:9} {workload:8} {p:8.3f} {v:10.3f} {v / p:15.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
