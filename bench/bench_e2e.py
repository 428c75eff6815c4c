"""OCI end to end, NBD mode inside user-mode Linux: time to the first byte of one small file of a
~500 MB registry image, lazily (erofs-mount --mode nbd) beside "download the whole blob, then
loop-mount it"; bytes fetched in each case.  Figures, not pass/fail.

The image is bench_oci's (an uncompressed ~500 MB EROFS image with a 10 KB /etc/app/app.conf),
pushed once on the host into bench/work/oci/storage.  In the guest: docker-registry over that
storage (hostfs), the fault proxy of tests/oci adding ``--delay`` (20 ms) to every request, then
alternating rounds of

    nbd    `erofs-mount --mode nbd -o oci.layer=0,oci.insecure REF MNT`, then read 1 byte of the file
           (clock from the command's start; bytes fetched: the daemon's published statistics);
           nbd-ra128: the same with the device's read-ahead at the kernel default (128 KiB, not 4 MiB)
    loop   GET the whole blob through the proxy into a file, `mount -o loop,ro`, read 1 byte

    python -m bench e2e            (or: python -m bench.bench_e2e [--delay 0.02] [--rounds 2])
"""

from __future__ import annotations

import argparse
import json
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

SMALL = "etc/app/app.conf"
MiB = 1 << 20


# ------------------------------------------------------------------------------------- guest side
def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def _first_byte(path: Path, timeout: float = 120) -> bytes:
    deadline = time.monotonic() + timeout
    while True:  # bounded: the mount is live when the command returned, this is a single read
        with open(path, "rb") as f:
            b = f.read(1)
        if b or time.monotonic() > deadline:
            return b


def _nbd_round(ref: str, mnt: Path, extra: str = "") -> dict:
    from erofs_mount.backends.nbd import lifecycle, state, sysfs

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "erofs_mount", "--mode", "nbd", "-o", "oci.layer=0,oci.insecure" + extra,
                          ref, str(mnt)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    t_mounted = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"erofs-mount failed: {res.stderr}")
    assert _first_byte(mnt / SMALL)
    t_first = time.perf_counter() - t0
    index = sysfs.index_of(sysfs.mount_at(str(mnt)).source)
    ident = sysfs.backend(index)
    t_pub = time.time()
    doc = None
    for _ in range(100):  # the daemon publishes every second
        doc = state.read_json(state.stats_path(ident))
        if doc and doc.get("updated", 0) > t_pub:
            break
        time.sleep(0.05)
    stats = (doc or {}).get("stats", {})
    server = (doc or {}).get("server", {})
    lifecycle.unmount(str(mnt))
    return {"first_byte_s": t_first, "mounted_s": t_mounted, "bytes_fetched": stats.get("bytes_fetched"),
            "requests": stats.get("requests"), "kernel_bytes": server.get("bytes_read"),
            "kernel_reads": server.get("reads")}


def _loop_round(url: str, size: int, mnt: Path, work: Path) -> dict:
    import httpx

    blob = work / "blob.erofs"
    t0 = time.perf_counter()
    got = 0
    with httpx.Client(timeout=60) as c, c.stream("GET", url, follow_redirects=True) as r, open(blob, "wb") as f:
        r.raise_for_status()
        for piece in r.iter_bytes(4 * MiB):
            f.write(piece)
            got += len(piece)
    t_downloaded = time.perf_counter() - t0
    subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(blob), str(mnt)], check=True, timeout=120)
    assert _first_byte(mnt / SMALL)
    t_first = time.perf_counter() - t0
    subprocess.run(["umount", "-d", str(mnt)], check=True, timeout=120)
    blob.unlink()
    assert got == size, (got, size)
    return {"first_byte_s": t_first, "downloaded_s": t_downloaded, "bytes_fetched": got, "requests": 1}


def guest_bench(storage: str, digest: str, size: int, delay: float, rounds: int, out: str) -> None:
    from tests.oci._servers import start_registry

    work = Path(tempfile.mkdtemp(prefix="e2e-", dir=os.path.dirname(out)))  # host disk (hostfs), not RAM
    reg = start_registry(work / "registry", Path(storage))
    proxy = subprocess.Popen(["setpriv", "--pdeathsig", "TERM", sys.executable, "-m", "tests.oci._faultproxy",
                              str(reg.port), str(delay)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    results: dict[str, list] = {"nbd": [], "nbd-ra128": [], "loop": []}
    try:
        host = f"127.0.0.1:{int(proxy.stdout.readline())}"
        ref = f"{host}/bench/app:v1"
        mnt = work / "mnt"
        mnt.mkdir()
        for _ in range(rounds):
            _drop_caches()
            results["nbd"].append(_nbd_round(ref, mnt))
            _drop_caches()
            results["nbd-ra128"].append(_nbd_round(ref, mnt, ",nbd.read_ahead_kb=128"))
            _drop_caches()
            results["loop"].append(_loop_round(f"http://{host}/v2/bench/app/blobs/{digest}", size, mnt, work))
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    Path(out).write_text(json.dumps(results))


# -------------------------------------------------------------------------------------- host side
def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_e2e")
    ap.add_argument("--delay", type=float, default=0.020, help="seconds the proxy adds to every request")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--image-mb", type=int, default=500)
    ap.add_argument("--guest", nargs=6, metavar=("STORAGE", "DIGEST", "SIZE", "DELAY", "ROUNDS", "OUT"))
    args = ap.parse_args(argv)
    if args.guest:
        s, d, size, delay, rounds, out = args.guest
        guest_bench(s, d, int(size), float(delay), int(rounds), out)
        return 0

    from bench.bench_oci import build_image, push_image
    from tests.nbd.uml import boot, uml_available
    from tests.oci._servers import REGISTRY_BIN, start_registry

    if uml_available() or REGISTRY_BIN is None or shutil.which("mkfs.erofs") is None:
        print(f"bench_e2e skipped: {uml_available() or 'needs docker-registry and mkfs.erofs'}")
        return 0
    work = HERE / "work" / "oci"
    work.mkdir(parents=True, exist_ok=True)
    image = build_image(work, args.image_mb)
    size = image.stat().st_size
    reg = start_registry(work / "registry", work / "storage")
    try:
        digest = push_image(reg.url, image)
    finally:
        reg.stop()
    rundir = Path(tempfile.mkdtemp(prefix="e2ebench-uml"))
    out = rundir / "results.json"
    script = (f"cd {REPO}\nPYTHONDONTWRITEBYTECODE=1 {sys.executable} -m bench.bench_e2e --guest "
              f"{work / 'storage'} {digest} {size} {args.delay} {args.rounds} {out}\n")
    t0 = time.perf_counter()
    rc, log = boot(rundir, script, 900)
    if rc != 0 or not out.exists():
        print(f"bench_e2e: UML run failed (rc={rc}):\n{log[-3000:]}")
        return 0
    res = json.loads(out.read_text())
    print(f"image {size / MiB:.0f} MiB, proxy +{args.delay * 1000:.0f} ms per request, inside UML "
          f"({args.rounds} alternating rounds, {time.perf_counter() - t0:.0f} s); times from the command's start:")
    for name, rows in res.items():
        first = statistics.median(r["first_byte_s"] for r in rows)
        fetched = statistics.median(r["bytes_fetched"] or 0 for r in rows)
        extra = (f"mount command {statistics.median(r['mounted_s'] for r in rows):.2f} s" if name != "loop"
                 else f"download {statistics.median(r['downloaded_s'] for r in rows):.2f} s")
        print(f"  {name:>9}: first byte of /{SMALL} after {first:6.2f} s ({extra}); "
              f"bytes fetched {fetched / MiB:8.2f} MiB ({fetched:.0f}), requests {rows[0]['requests']}")
        if name != "loop":
            print(f"        the kernel asked for {statistics.median(r['kernel_bytes'] or 0 for r in rows) / MiB:.2f} MiB"
                  f" in {rows[0]['kernel_reads']} NBD reads")
        print("        rounds: " + ", ".join(f"{r['first_byte_s']:.2f}s/{(r['bytes_fetched'] or 0) / MiB:.2f}MiB"
                                              for r in rows))
    shutil.rmtree(rundir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
