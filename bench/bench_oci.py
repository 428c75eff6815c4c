"""OCI source benchmark: lazily reading an EROFS layer from a real registry through a 20 ms proxy.

Figures, not pass/fail.  Needs Debian's docker-registry and mkfs.erofs.

    python -m bench oci            # or: python bench/bench_oci.py [--image-mb 500] [--delay 0.02]

Builds once (bench/work/oci/) an uncompressed EROFS image of ~500 MB holding a
100 MB file, 400 MB of other files, a few thousand small files and one 10 KB
file; pushes it to a docker-registry on 127.0.0.1 and puts the fault proxy of
tests/oci (no faults, ``--delay`` seconds added to every request) in front.

    cat        open the layer (resolve + magic check) and `cat` the 10 KB file with the
               pure reader: round trips and bytes fetched (targets: <= 6 round trips, <= 4 MB)
    seq        read the 100 MB file: OciBlobSource, the reader on top of it, a serial
               32 KiB-per-request reader (erofs-utils' strategy) and one streaming GET
    random     random 4 KiB reads: bytes fetched / bytes needed, per chunk size
    local      LocalSource 4 KiB reads from the page cache: inline RWF_NOWAIT vs a thread

``--only seq,cat`` runs only those parts; "fetched" is network bytes (bytes_fetched +
bytes_discarded).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import trio  # noqa: E402

from erofs_mount.sources.bridge import SyncReadAt  # noqa: E402
from erofs_mount.sources.local import LocalSource  # noqa: E402
from erofs_mount.sources.oci.blob import open_oci_source  # noqa: E402
from erofs_mount.sources.oci.options import OciOptions  # noqa: E402
from tests.oci._servers import REGISTRY_BIN, Pusher, start_registry  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10
CAT_PATH = "/etc/app/app.conf"
BIG_PATH = "/data/big-100M.bin"


def build_image(work: Path, image_mb: int) -> Path:
    image = work / f"image-{image_mb}M.erofs"
    if image.exists():
        return image
    tree = work / "tree"
    if tree.exists():
        subprocess.run(["rm", "-rf", str(tree)], check=True)
    rng = random.Random(1)
    (tree / "data").mkdir(parents=True)
    (tree / "etc" / "app").mkdir(parents=True)

    def write_random(path: Path, size: int) -> None:
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 4 * MiB)
                f.write(rng.randbytes(n))
                left -= n

    write_random(tree / "data" / "big-100M.bin", 100 * MiB)
    filler = max(0, image_mb - 110)
    for i in range(0, filler, 50):
        write_random(tree / "data" / f"filler-{i:03d}.bin", min(50, filler - i) * MiB)
    for d in range(40):
        sub = tree / "small" / f"d{d:02d}"
        sub.mkdir(parents=True)
        for k in range(100):
            (sub / f"f{k:03d}.txt").write_bytes(rng.randbytes(rng.randrange(100, 6000)))
    (tree / "etc" / "app" / "app.conf").write_bytes(rng.randbytes(10_000))
    tmp = image.with_suffix(".tmp")
    subprocess.run(["mkfs.erofs", "-T1700000000", "--quiet", str(tmp), str(tree)], check=True)
    tmp.rename(image)
    subprocess.run(["rm", "-rf", str(tree)], check=True)
    return image


def push_image(base: str, image: Path) -> str:
    p = Pusher(base)
    try:
        import hashlib
        import json

        h = hashlib.sha256()
        with open(image, "rb") as f:
            for block in iter(lambda: f.read(4 * MiB), b""):
                h.update(block)
        digest = "sha256:" + h.hexdigest()
        size = image.stat().st_size
        repo = "bench/app"
        if p.http.head(f"{base}/v2/{repo}/blobs/{digest}").status_code != 200:
            r = p.http.post(f"{base}/v2/{repo}/blobs/uploads/")
            loc = httpx.URL(base).join(r.headers["location"])
            with open(image, "rb") as f:
                r = p.http.put(loc.copy_add_param("digest", digest), content=f,
                               headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                               timeout=600)
            assert r.status_code == 201, r.text
        cfg = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": p.blob(repo, cfg),
                          "size": len(cfg)},
               "layers": [{"mediaType": "application/vnd.erofs", "digest": digest, "size": size}]}
        p.manifest(repo, "v1", doc)
        return digest
    finally:
        p.close()


def _fmt_rate(nbytes: int, secs: float) -> str:
    return f"{nbytes / MiB / secs:7.1f} MiB/s"


def _round_trips(s: dict) -> int:
    return s["requests"] + s["token_requests"]


def _net(s: dict) -> int:
    """Bytes that came over the network: delivered into chunks, or received and dropped."""
    return s["bytes_fetched"] + s.get("bytes_discarded", 0)


async def bench_cat(ref: str, chunk: int) -> None:
    from erofs_mount.erofs.image import Image

    opts = OciOptions(insecure=True, chunk_size=chunk)
    t0 = time.perf_counter()
    src = await open_oci_source(ref, options=opts)
    t1 = time.perf_counter()
    n1 = _round_trips(src.stats())
    b1 = _net(src.stats())
    bridge = SyncReadAt.here(src)

    def cat() -> bytes:
        img = Image(bridge, size=src.size)
        nid = img.resolve(CAT_PATH)
        return img.read(nid, 0, 1 << 20)

    data = await trio.to_thread.run_sync(cat)
    t2 = time.perf_counter()
    s = src.stats()
    await src.aclose()
    n2 = _round_trips(s)
    print(f"  chunk {chunk // KiB:5d} KiB: open {t1 - t0:6.3f} s ({n1} requests, {b1 / MiB:.2f} MiB);"
          f" cat {len(data)} B {t2 - t1:6.3f} s ({n2 - n1} more requests);"
          f" total {t2 - t0:6.3f} s, {n2} round trips, {_net(s) / MiB:.2f} MiB fetched")


async def find_extent(ref: str, opts: OciOptions) -> tuple[int, int]:
    """(blob offset, size) of the 100 MB file (contiguous in an uncompressed image)."""
    from erofs_mount.erofs.image import Image

    src = await open_oci_source(ref, options=opts)
    bridge = SyncReadAt.here(src)

    def where() -> tuple[int, int]:
        img = Image(bridge, size=src.size)
        nid = img.resolve(BIG_PATH)
        ino = img.inode(nid)
        head = img.read(nid, 0, 4096)
        # find the first block of the file by content, then check contiguity at the end
        for blk in range(0, src.size // img.block_size):
            if bridge.read_at(blk * img.block_size, 64) == head[:64]:
                off = blk * img.block_size
                if bridge.read_at(off + ino.size - 4096, 4096) == img.read(nid, ino.size - 4096, 4096):
                    return off, ino.size
        raise RuntimeError("big file not found")

    try:
        return await trio.to_thread.run_sync(where)
    finally:
        await src.aclose()


async def bench_seq(proxy_host: str, ref: str, digest: str, serial_mb: int, rounds: int) -> None:
    """Source, reader and one streaming GET measured alternately *rounds* times (medians: the
    machine is shared and single runs vary by 2x)."""
    from erofs_mount.erofs.image import Image

    opts = OciOptions(insecure=True)
    off, size = await find_extent(ref, OciOptions(insecure=True, chunk_size=64 * KiB, readahead=0))
    url = f"http://{proxy_host}/v2/bench/app/blobs/{digest}"
    times: dict[str, list[float]] = {"source": [], "reader": [], "stream": []}
    last = {}

    async def source_run() -> None:
        src = await open_oci_source(ref, options=opts)  # 128 KiB reads: the kernel's usual read-ahead unit
        t0 = time.perf_counter()
        for pos in range(off, off + size, 128 * KiB):
            await src.read_at(pos, 128 * KiB)
        times["source"].append(time.perf_counter() - t0)
        last["source"] = src.stats()
        await src.aclose()

    async def reader_run() -> None:
        src = await open_oci_source(ref, options=opts)  # the pure reader on top, 1 MiB reads in a thread
        bridge = SyncReadAt.here(src)

        def read_file() -> int:
            img = Image(bridge, size=src.size)
            nid = img.resolve(BIG_PATH)
            n = 0
            while True:
                piece = img.read(nid, n, MiB)
                if not piece:
                    return n
                n += len(piece)

        t0 = time.perf_counter()
        got = await trio.to_thread.run_sync(read_file)
        times["reader"].append(time.perf_counter() - t0)
        assert got == size
        await src.aclose()

    async with httpx.AsyncClient(timeout=30) as c:
        async def stream_run() -> None:
            t0 = time.perf_counter()
            got = 0
            async with c.stream("GET", url, headers={"Range": f"bytes={off}-{off + size - 1}"}) as r:
                async for piece in r.aiter_raw():
                    got += len(piece)
            times["stream"].append(time.perf_counter() - t0)
            assert got == size

        for _ in range(rounds):
            await source_run()
            await stream_run()
            await reader_run()
        # erofs-utils' strategy: one uncached Range GET per 32 KiB, strictly serial (first serial_mb MiB)
        n = serial_mb * MiB
        t0 = time.perf_counter()
        for pos in range(off, off + n, 32 * KiB):
            r = await c.get(url, headers={"Range": f"bytes={pos}-{pos + 32 * KiB - 1}"})
            assert r.status_code == 206 and len(r.content) == 32 * KiB
        serial = n / (time.perf_counter() - t0)
    rate = {k: size / statistics.median(v) for k, v in times.items()}
    spread = {k: f"{size / max(v) / MiB:.0f}-{size / min(v) / MiB:.0f}" for k, v in times.items()}
    s = last["source"]
    print(f"  (medians of {rounds} alternating rounds; range in MiB/s in brackets)")
    print(f"  OciBlobSource, 128 KiB reads:     {_fmt_rate(int(rate['source']), 1)} [{spread['source']}]"
          f"  ({s['requests']} requests, {s['streams']} read-ahead stream(s), {_net(s) / MiB:.1f} MiB fetched)")
    print(f"  reader over OciBlobSource, 1 MiB: {_fmt_rate(int(rate['reader']), 1)} [{spread['reader']}]")
    print(f"  one streaming GET:                {_fmt_rate(int(rate['stream']), 1)} [{spread['stream']}]")
    print(f"  serial 32 KiB GETs ({serial_mb} MiB):     {_fmt_rate(int(serial), 1)}")
    print(f"  ratios: source / serial-32K = {rate['source'] / serial:.1f}x (target >= 10x);"
          f" source / streaming GET = {rate['source'] / rate['stream']:.2f} (target >= 0.8);"
          f" reader / streaming GET = {rate['reader'] / rate['stream']:.2f}")


async def bench_random(ref: str, size: int, reads: int) -> None:
    rng = random.Random(4)
    offsets = [rng.randrange(0, size - 4096) & ~4095 for _ in range(reads)]
    for chunk in (MiB, 256 * KiB, 64 * KiB):
        src = await open_oci_source(ref, options=OciOptions(insecure=True, chunk_size=chunk))
        base = _net(src.stats())
        lat = []
        for off in offsets:
            t0 = time.perf_counter()
            await src.read_at(off, 4096)
            lat.append(time.perf_counter() - t0)
        s = src.stats()
        await src.aclose()
        needed = len(set(offsets)) * 4096
        print(f"  chunk {chunk // KiB:5d} KiB: fetched/needed = {(_net(s) - base) / needed:6.1f}"
              f"  median read {statistics.median(lat) * 1000:6.1f} ms, {s['cache_hits']} cache hits")


def bench_local(image: Path, reads: int = 20000) -> None:
    async def run() -> None:
        src = LocalSource.open(image)
        rng = random.Random(5)
        offs = [rng.randrange(0, 64 * MiB) & ~4095 for _ in range(reads)]
        for off in offs:  # warm the page cache
            src.pread(off, 4096)
        t0 = time.perf_counter()
        for off in offs:
            await src.read_at(off, 4096)
        inline = (time.perf_counter() - t0) / reads
        t0 = time.perf_counter()
        for off in offs:
            await trio.to_thread.run_sync(src.pread, off, 4096)
        thread = (time.perf_counter() - t0) / reads
        t0 = time.perf_counter()
        for off in offs:
            src.pread(off, 4096)
        plain = (time.perf_counter() - t0) / reads
        s = src.stats()
        src.close()
        print(f"  4 KiB cached reads: read_at {inline * 1e6:6.1f} us (inline {s['inline_reads']}, thread {s['thread_reads']}),"
              f" always-thread {thread * 1e6:6.1f} us, sync pread {plain * 1e6:6.1f} us")

    trio.run(run)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_oci")
    ap.add_argument("--image-mb", type=int, default=500)
    ap.add_argument("--delay", type=float, default=0.020, help="seconds the proxy adds to every request")
    ap.add_argument("--serial-mb", type=int, default=8, help="MiB read by the serial 32 KiB reader")
    ap.add_argument("--random-reads", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the sequential comparison")
    ap.add_argument("--work", default=str(HERE / "work" / "oci"))
    ap.add_argument("--only", default="cat,seq,random,local",
                    help="comma-separated parts to run: cat, seq, random, local (default: all)")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"cat", "seq", "random", "local"}
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    if REGISTRY_BIN is None or not any(os.access(os.path.join(d, "mkfs.erofs"), os.X_OK)
                                       for d in os.environ.get("PATH", "").split(":")):
        print("bench_oci: needs docker-registry and mkfs.erofs; skipped")
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    image = build_image(work, args.image_mb)
    print(f"image {image.name}: {image.stat().st_size / MiB:.0f} MiB (built/reused in {time.perf_counter() - t0:.1f} s)")
    reg = start_registry(work / "registry", work / "storage")
    try:
        t0 = time.perf_counter()
        digest = push_image(reg.url, image)
        print(f"pushed to {reg.host} in {time.perf_counter() - t0:.1f} s; proxy adds {args.delay * 1000:.0f} ms per request")

        # the proxy runs in its own process: it must not share the measured client's CPU
        proxy_proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", sys.executable, "-m", "tests.oci._faultproxy", str(reg.port),
             str(args.delay)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            proxy_host = f"127.0.0.1:{int(proxy_proc.stdout.readline())}"

            async def run() -> None:
                ref = f"{proxy_host}/bench/app:v1"
                if "cat" in parts:
                    print("cat one 10 KB file (pure reader over the registry):")
                    for chunk in (MiB, 256 * KiB, 64 * KiB):
                        await bench_cat(ref, chunk)
                if "seq" in parts:
                    print("sequential read of the 100 MB file:")
                    await bench_seq(proxy_host, ref, digest, args.serial_mb, args.rounds)
                if "random" in parts:
                    print(f"{args.random_reads} random 4 KiB reads:")
                    await bench_random(ref, image.stat().st_size, args.random_reads)

            trio.run(run)
        finally:
            proxy_proc.terminate()
            proxy_proc.wait(timeout=10)
    finally:
        reg.stop()
    if "local" in parts:
        print("LocalSource:")
        bench_local(image)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
