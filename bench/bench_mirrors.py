"""Mirrors (issue 20): N machines mounting one image, each straight from the origin or through one mirror.

    python -m bench mirrors     (or: python -m bench.bench_mirrors [--mounts 8] [--size-mb 500])

One EROFS image holding one file of random bytes (``--size-mb``), pushed to an origin
docker-registry on 127.0.0.1.  ``--mounts`` FUSE mounts (``oci.cache=none``: each one a machine of
its own) read the whole file at the same time, three ways:

    origin        every mount reads from the origin
    plain mirror  through a registries.conf mirror that holds the image (pushed to it as well)
    pull-through  through docker-registry's pull-through cache of the origin, empty at the start

Printed: bytes of blob bodies the origin served (its access log), the mirror served, and the
wall time until every reader finished.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work" / "mirrors"
PY = sys.executable


def _cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "erofs_mount", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def make_image(size_mb: int) -> Path:
    img = WORK / f"big-{size_mb}m.erofs"
    if img.exists():
        return img
    src = WORK / "tree"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    with open(src / "big.bin", "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(1 << 20))
    tmp = img.with_suffix(".tmp")
    subprocess.run(["mkfs.erofs", "--quiet", "-T1700000000", str(tmp), str(src)], check=True, timeout=600)
    tmp.rename(img)
    shutil.rmtree(src)
    return img


def read_all(path: str, errors: list) -> None:
    try:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
    except OSError as exc:
        errors.append(f"{path}: {exc}")


def scenario(name: str, ref: str, mounts: int, env: dict, tmp: Path) -> tuple[float, list[str]]:
    mnts = []
    try:
        for i in range(mounts):
            mnt = tmp / f"{name}-{i}"
            mnt.mkdir()
            res = _cli("--mode", "fuse", "-o", "oci.layer=0,oci.insecure,oci.cache=none", ref, str(mnt), env=env)
            if res.returncode:
                raise RuntimeError(res.stderr.strip())
            mnts.append(str(mnt))
        errors: list[str] = []
        threads = [threading.Thread(target=read_all, args=(m + "/big.bin", errors)) for m in mnts]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0, errors
    finally:
        for m in mnts:
            _cli("-u", m, env=env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench mirrors")
    ap.add_argument("--mounts", type=int, default=8)
    ap.add_argument("--size-mb", type=int, default=500)
    a = ap.parse_args(argv or [])
    if os.geteuid() != 0:
        print("bench mirrors: needs root (FUSE mounts as root)")
        return 0
    sys.path.insert(0, str(REPO))
    from tests.oci._servers import REGISTRY_BIN, Pusher, blob_bytes, sha256, start_registry

    if REGISTRY_BIN is None or not shutil.which("mkfs.erofs"):
        print("bench mirrors: skipped (docker-registry or mkfs.erofs missing)")
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    img = make_image(a.size_mb)
    blob = img.read_bytes()
    digest = sha256(blob)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    regs = []
    try:
        origin = start_registry(run / "origin", run / "origin-storage", access_log=True)
        mirror = start_registry(run / "mirror", run / "mirror-storage", access_log=True)
        pull = start_registry(run / "pull", run / "pull-storage", access_log=True, proxy={"remoteurl": origin.url})
        regs = [origin, mirror, pull]
        manifest = None
        for reg in (origin, mirror):
            p = Pusher(reg.url)
            manifest, _ = p.image("bench/big", "v1", [("application/vnd.erofs", blob)])
            p.close()
        ref = f"{origin.host}/bench/big@{manifest}"
        print(f"{a.mounts} FUSE mounts (no shared cache) each reading a {len(blob) / 1e6:.0f} MB image's file, at once")
        print(f"{'how':14} {'origin MB':>10} {'mirror MB':>10} {'origin/image':>13} {'wall s':>8}")
        for name, mirror_reg in (("origin", None), ("plain mirror", mirror), ("pull-through", pull)):
            conf = run / f"{name.replace(' ', '-')}.conf"
            conf.write_text(f'[[registry]]\nlocation = "{origin.host}"\n' + (
                f'[[registry.mirror]]\nlocation = "{mirror_reg.host}"\ninsecure = true\n' if mirror_reg else ""))
            env = {"CONTAINERS_REGISTRIES_CONF": str(conf), "EROFS_MOUNT_HOSTS_DIR": str(run / "none")}
            o0 = blob_bytes(origin, digest)
            m0 = blob_bytes(mirror_reg, digest) if mirror_reg else 0
            try:
                wall, errors = scenario(name.replace(" ", "-"), ref, a.mounts, env, run)
            except RuntimeError as exc:
                print(f"{name:14} skipped: {exc}")
                continue
            time.sleep(0.5)
            o = blob_bytes(origin, digest) - o0
            m = (blob_bytes(mirror_reg, digest) - m0) if mirror_reg else 0
            print(f"{name:14} {o / 1e6:10.1f} {m / 1e6:10.1f} {o / len(blob):13.2f} {wall:8.1f}"
                  + (f"  ERRORS: {errors[:3]}" if errors else ""), flush=True)
    finally:
        for reg in regs:
            reg.stop()
        shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
