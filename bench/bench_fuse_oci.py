"""OCI end to end, FUSE mode on the host: time to the first byte of one small file of a ~500 MB
registry image, lazily (`erofs-mount --mode fuse -o oci.layer=0 REF MNT`) beside "download the whole
blob, then loop-mount it"; bytes fetched in each case.  Figures, not pass/fail.  The FUSE row of
issue 7's benchmark (the NBD row runs inside UML: bench_e2e.py).

The image is bench_oci's (an uncompressed ~500 MB EROFS image with a 10 KB /etc/app/app.conf), pushed
into bench/work/oci/storage; docker-registry over that storage, the fault proxy of tests/oci adding
``--delay`` (20 ms) to every request, then alternating rounds (page cache dropped before each) of

    fuse        `erofs-mount --mode fuse -o oci.layer=0,oci.insecure REF MNT`, read 1 byte of the file
                (clock from the command's start; bytes fetched: the daemon's published statistics)
    fuse-cache  the same with `oci.cache=DIR` whose blob cache a previous mount filled (warm start)
    loop        GET the whole blob through the proxy into a file, `mount -o loop,ro`, read 1 byte

    python -m bench fuse_oci       (or: python -m bench.bench_fuse_oci [--delay 0.02] [--rounds 3])
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_e2e import SMALL, _drop_caches, _first_byte, _loop_round  # noqa: E402

MiB = 1 << 20


def _published(mnt: Path, after: float) -> dict:
    from erofs_mount.backends.fuse import publish

    path = os.path.join(publish.stats_dir(), publish.key(str(mnt)))
    doc = None
    for _ in range(100):  # the daemon publishes every second: bounded wait for a fresh document
        doc = publish.read_json(path)
        if doc and doc.get("updated", 0) > after:
            break
        time.sleep(0.05)
    return (doc or {}).get("stats", {})


def _fuse_round(ref: str, mnt: Path, extra: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "erofs_mount", "--mode", "fuse", "-o", "oci.layer=0,oci.insecure" + extra,
                          ref, str(mnt)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    t_mounted = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"erofs-mount failed: {res.stderr}")
    assert _first_byte(mnt / SMALL)
    t_first = time.perf_counter() - t0
    stats = _published(mnt, time.time())
    subprocess.run([sys.executable, "-m", "erofs_mount", "-u", str(mnt)], env=env, cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    for _ in range(200):  # the daemon ends once unmounted (bounded)
        if not _daemons(mnt):
            break
        time.sleep(0.05)
    return {"first_byte_s": t_first, "mounted_s": t_mounted, "bytes_fetched": stats.get("bytes_fetched"),
            "requests": stats.get("requests"), "disk_hits": stats.get("disk_hits")}


def _daemons(mnt: Path) -> list[int]:
    want = os.fsencode(str(mnt))
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if want in f.read().split(b"\0"):
                        out.append(int(entry))
            except OSError:
                pass
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_fuse_oci")
    ap.add_argument("--delay", type=float, default=0.020, help="seconds the proxy adds to every request")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-mb", type=int, default=500)
    args = ap.parse_args(argv)

    from bench.bench_oci import build_image, push_image
    from tests.oci._servers import REGISTRY_BIN, start_registry

    if os.geteuid() != 0 or REGISTRY_BIN is None or shutil.which("mkfs.erofs") is None or not os.path.exists("/dev/fuse"):
        print("bench_fuse_oci skipped: needs root (drop_caches, loop mounts), /dev/fuse, docker-registry, mkfs.erofs")
        return 0
    work = HERE / "work" / "oci"
    work.mkdir(parents=True, exist_ok=True)
    image = build_image(work, args.image_mb)
    size = image.stat().st_size
    tmp = Path(tempfile.mkdtemp(prefix="fuseoci-", dir=work))
    reg = start_registry(tmp / "registry", work / "storage")
    proxy = None
    results: dict[str, list] = {"fuse": [], "fuse-cache": [], "loop": []}
    try:
        digest = push_image(reg.url, image)
        proxy = subprocess.Popen(["setpriv", "--pdeathsig", "TERM", sys.executable, "-m", "tests.oci._faultproxy",
                                  str(reg.port), str(args.delay)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
        host = f"127.0.0.1:{int(proxy.stdout.readline())}"
        ref = f"{host}/bench/app:v1"
        mnt = tmp / "mnt"
        mnt.mkdir()
        cache = tmp / "cache"
        for _ in range(args.rounds):
            _drop_caches()
            results["fuse"].append(_fuse_round(ref, mnt))
            shutil.rmtree(cache, ignore_errors=True)
            _fuse_round(ref, mnt, f",oci.cache={cache}")  # fills the blob cache (not counted)
            _drop_caches()
            results["fuse-cache"].append(_fuse_round(ref, mnt, f",oci.cache={cache}"))
            _drop_caches()
            results["loop"].append(_loop_round(f"http://{host}/v2/bench/app/blobs/{digest}", size, mnt, tmp))
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=10)
        reg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"image {size / MiB:.0f} MiB, proxy +{args.delay * 1000:.0f} ms per request, host FUSE "
          f"({args.rounds} alternating rounds, medians); times from the command's start:")
    for name, rows in results.items():
        first = statistics.median(r["first_byte_s"] for r in rows)
        fetched = statistics.median(r["bytes_fetched"] or 0 for r in rows)
        extra = (f"mount command {statistics.median(r['mounted_s'] for r in rows):.2f} s" if name != "loop"
                 else f"download {statistics.median(r['downloaded_s'] for r in rows):.2f} s")
        print(f"  {name:>10}: first byte of /{SMALL} after {first:6.2f} s ({extra}); "
              f"bytes fetched {fetched / MiB:8.2f} MiB ({fetched:.0f}), requests {rows[0]['requests']}")
        print("        rounds: " + ", ".join(f"{r['first_byte_s']:.2f}s/{(r['bytes_fetched'] or 0) / MiB:.2f}MiB"
                                              for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
