"""Verified reads (issue 22): the cost of checking every block against a dm-verity tree.

    python -m bench verity     (or: python -m bench.bench_verity [--runs 5] [--only uncompressed,lz4hc])

The images are bench_fuse's (``/usr/lib/python3*``, man, include + the largest ELF as big.bin), one
copy of each with its tree appended by ``erofs-mount verity-format`` (bench/work/verity/).  For FUSE
and for fanotify (an empty sparse file each run), with and without ``-o verity.roothash=``, the
targets taking turns in every run, page/dentry/inode caches dropped before each measurement:

    big      read big.bin sequentially (1 MiB reads; 20-160 MB)
    bigcat   the same in 128 KiB reads, as cat does
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


class Registry:
    """A docker-registry on 127.0.0.1 serving each image twice: a manifest whose layer carries the root
    hash annotation (pinned by digest: verified) and one without (unverified); the same blob."""

    def __init__(self) -> None:
        sys.path.insert(0, bf.REPO)
        from tests.oci._servers import REGISTRY_BIN, Pusher, start_registry

        if REGISTRY_BIN is None:
            raise RuntimeError("docker-registry is not installed")
        root = os.path.join(WORK, "registry")
        shutil.rmtree(root, ignore_errors=True)
        from pathlib import Path

        self.reg = start_registry(Path(root) / "run", Path(root) / "storage")
        self.pusher = Pusher(self.reg.url)
        self.refs: dict[tuple[str, bool], str] = {}

    def push(self, comp: str, image: str, root: str) -> None:
        from erofs_mount.verity.format import ANNOTATION_ROOT

        with open(image, "rb") as f:
            blob = f.read()
        mt = "application/vnd.erofs"
        for verified in (False, True):
            layer = (mt, blob, {ANNOTATION_ROOT: root}) if verified else (mt, blob)
            digest, _ = self.pusher.image(f"bench/{comp}", "v" if verified else "p", [layer])
            self.refs[(comp, verified)] = f"{self.reg.host}/bench/{comp}@{digest}"

    def stop(self) -> None:
        self.pusher.close()
        self.reg.stop()


def measure(mode: str, image: str, opts: list[str], workload: str, mnt: str) -> float:
    env = None
    cache = os.path.join(WORK, "fanotify-cache")
    if mode.startswith("registry"):   # image is the reference; cold: no persistent cache, warm: one kept
        mode, warm = "fuse", mode.endswith("warm")
        opts = ["oci.layer=0", "oci.insecure", f"oci.cache={os.path.join(WORK, 'blob-cache')}" if warm
                else "oci.cache=none", *opts]
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
    ap.add_argument("--modes", default="fuse,fanotify,registry-cold,registry-warm")
    ap.add_argument("--workloads", default="big,bigcat,readall")
    a = ap.parse_args(argv or [])
    if os.geteuid() != 0:
        print("bench verity: needs root (mounts, drop_caches)")
        return 0
    only = tuple(a.only.split(","))
    images = prepare(only)
    mnt = os.path.join(WORK, "mnt")
    modes = a.modes.split(",")
    reg = None
    if any(m.startswith("registry") for m in modes):
        try:
            reg = Registry()
            for comp, (image, root) in images.items():
                reg.push(comp, image, root)
        except RuntimeError as exc:
            print(f"registry rows skipped: {exc}")
            modes = [m for m in modes if not m.startswith("registry")]
    print(f"{'image':13} {'mode':14} {'workload':8} {'plain s':>8} {'verified s':>10} {'verified/plain':>15}")
    try:
        for comp in images:
            image, root = images[comp]
            for mode in modes:
                if mode.startswith("registry"):   # the annotation of the digest-pinned manifest: verified
                    plain_t, verified_t = (reg.refs[(comp, False)], []), (reg.refs[(comp, True)], [])
                else:
                    plain_t, verified_t = (image, []), (image, [f"verity.roothash={root}"])
                for workload in a.workloads.split(","):
                    times: dict[str, list[float]] = {"plain": [], "verified": []}
                    try:
                        if mode.endswith("warm"):   # the persistent cache filled (and marked) once
                            shutil.rmtree(os.path.join(WORK, "blob-cache"), ignore_errors=True)
                            measure(mode, *verified_t, "readall", mnt)
                        for _ in range(a.runs):   # the two take turns: drift hits both alike
                            times["plain"].append(measure(mode, *plain_t, workload, mnt))
                            times["verified"].append(measure(mode, *verified_t, workload, mnt))
                    except RuntimeError as exc:
                        print(f"{comp:13} {mode:14} {workload:8} skipped: {exc}")
                        continue
                    p, v = statistics.median(times["plain"]), statistics.median(times["verified"])
                    print(f"{comp:13} {mode:14} {workload:8} {p:8.3f} {v:10.3f} {v / p:15.3f}", flush=True)
    finally:
        if reg is not None:
            reg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
