"""Compressed read throughput: the pure reader vs Debian's `fsck.erofs --extract` on an lz4hc image.

The image (Debian mkfs.erofs 1.5, ``-zlz4hc``, and a ``-zlz4hc -C65536`` big-pcluster variant)
holds a copy of this machine's Python standard library (/usr/lib/python3.11, ~50 MB).
Figures, all measured in this run with a warm page cache:

* ``extract``: ``erofs-mount extract`` vs ``fsck.erofs --extract=DIR`` (to tmpfs when there is one);
* ``cat``: every regular file read in-process through ``Image.read`` in 1 MiB and 128 KiB (FUSE-sized)
  requests (decoded MB/s);
* ``cat 4k``: the same in 4 KiB sequential requests, with the decoded-pcluster cache hit ratio;
* ``seq 256k``: the biggest compressed file read in 256 KiB sequential requests (FUSE's max_read),
  a fresh ``Image`` then again with an emptied pcluster cache (the maps kept);
* ``every file``: every regular file of the image read in-process in 1 MiB requests, fresh ``Image``.

The last two also run on bench_fuse's ``work/fuse/bar-lz4hc.erofs`` (mkfs 1.5 ``-zlz4hc``, /usr/lib/python3*, man pages, headers
and a 100 MB file) when it exists.  ``BENCH_ZREAD_ONLY=1`` skips the extract comparison.

Figures, not pass/fail.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import build_image, timed

WORK = Path(os.environ.get("BENCH_WORK", Path(__file__).parent / "work"))
SOURCE = os.environ.get("BENCH_ZTREE_SOURCE", f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
ZREAD_ONLY = os.environ.get("BENCH_ZREAD_ONLY") == "1"
FUSE_IMAGE = WORK / "fuse" / "bar-lz4hc.erofs"


def build_tree(target: Path) -> Path:
    if target.exists():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(SOURCE, tmp, symlinks=True, ignore_dangling_symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages", "dist-packages"))
    tmp.rename(target)
    return target


def regular_files(img) -> list[tuple[int, int]]:
    import stat as st
    out, stack, seen = [], [img.root_nid], set()
    while stack:
        nid = stack.pop()
        for e in img.iterdir(nid):
            if e.name in (b".", b"..") or e.nid in seen:
                continue
            seen.add(e.nid)
            ino = img.inode(e.nid)
            if st.S_ISDIR(ino.mode):
                stack.append(e.nid)
            elif st.S_ISREG(ino.mode):
                out.append((e.nid, ino.size))
    return out


def _open_image(image: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from erofs_mount.erofs.image import Image
    fd = os.open(image, os.O_RDONLY)
    return Image(lambda pos, n: os.pread(fd, n, pos), size=os.fstat(fd).st_size), fd


def seq_biggest(image: Path, chunk: int = 256 << 10) -> tuple[str, int, list[float]]:
    """The biggest compressed file in ``chunk`` requests: fresh Image, then twice more with the
    decoded-pcluster cache emptied (maps and metadata kept)."""
    img, fd = _open_image(image)
    try:
        files = [(size, nid) for nid, size in regular_files(img) if img.inode(nid).is_compressed]
        if not files:
            return "", 0, []
        size, nid = max(files)
        times = []
        for run in range(3):
            if run:
                img.zreader.clear_cache()
            t0 = time.perf_counter()
            for off in range(0, size, chunk):
                img.read(nid, off, chunk)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return f"nid {nid}", size, times


def cat_all(image: Path, chunk: int) -> tuple[float, int, dict, int]:
    """Every regular file in ``chunk`` requests, a fresh Image (its directory walk not timed):
    (seconds, bytes, the compressed reader's statistics, files)."""
    img, fd = _open_image(image)
    try:
        files = regular_files(img)
        t0 = time.perf_counter()
        total = 0
        for nid, size in files:
            for off in range(0, size, chunk):
                total += len(img.read(nid, off, chunk))
        dt = time.perf_counter() - t0
        stats = img.zreader.stats() if img._zreader is not None else {}
    finally:
        os.close(fd)
    return dt, total, stats, len(files)


def read_figures(image: Path) -> None:
    what, size, times = seq_biggest(image)
    if times:
        print(f"seq 256 KiB requests, biggest compressed file ({what}, {size / 1e6:.1f} MB): "
              + ", ".join(f"{t:.3f} s" for t in times) + f"  (best {size / 1e6 / min(times):.0f} MB/s; "
              "first with a fresh Image, then with the pcluster cache emptied)")
    best = None
    for _ in range(RUNS):
        dt, total, _, n = cat_all(image, 1 << 20)
        best = dt if best is None else min(best, dt)
    print(f"every file, 1 MiB requests (in-process, fresh Image): {n} files, {total / 1e6:.1f} MB: "
          f"best of {RUNS} {best:.3f} s  {total / 1e6 / best:.1f} MB/s")


def main(argv: list[str]) -> None:
    if not shutil.which("fsck.erofs") or not shutil.which("mkfs.erofs"):
        print("erofs-utils not installed: skipped")
        return
    if not os.path.isdir(SOURCE):
        print(f"{SOURCE} not found: skipped")
        return
    WORK.mkdir(parents=True, exist_ok=True)
    tree = build_tree(WORK / "pystdlib")
    data = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file() and not f.is_symlink())
    erofs_mount = str(Path(sys.executable).with_name("erofs-mount"))
    shm = Path("/dev/shm")
    dest = (shm / "erofs-mount-zbench-out") if shm.is_dir() and os.access(shm, os.W_OK) else WORK / "zout"
    for label, opts in (("lz4hc", ("-zlz4hc",)), ("lz4hc -C65536", ("-zlz4hc", "-C65536"))):
        image = build_image(tree, WORK / f"pystdlib-{label.replace(' ', '')}.erofs", *opts)
        print(f"\n== {image.name} ({label}): {image.stat().st_size / 1e6:.1f} MB image, "
              f"{data / 1e6:.1f} MB of file data")
        read_figures(image)
        if ZREAD_ONLY:
            continue
        ours = [erofs_mount, "extract", "--no-progress", str(image), str(dest)]
        theirs = ["fsck.erofs", f"--extract={dest}", "--overwrite", str(image)]
        timed(theirs, dest)     # warm the page cache
        t_ours, t_theirs = [], []
        for _ in range(RUNS):
            t_theirs.append(timed(theirs, dest))
            try:
                t_ours.append(timed(ours, dest))
            except subprocess.CalledProcessError as exc:
                print(f"erofs-mount extract failed: {exc}")
                break
        mt = statistics.median(t_theirs)
        print(f"extract  fsck.erofs --extract: {mt:6.2f} s  {data / 1e6 / mt:7.1f} MB/s")
        if t_ours:
            mo = statistics.median(t_ours)
            print(f"extract  erofs-mount extract:  {mo:6.2f} s  {data / 1e6 / mo:7.1f} MB/s  "
                  f"(ratio ours/fsck = {mo / mt:.2f}x the time)")
        for chunk in (1 << 20, 128 << 10, 4096):
            dt, total, stats, _ = cat_all(image, chunk)
            hr = stats.get("hit_ratio", 0.0)
            print(f"cat {chunk // 1024:>4} KiB requests (in-process Image.read): {dt:6.2f} s  "
                  f"{total / 1e6 / dt:7.1f} MB/s  pcluster cache: hits {stats.get('hits')} misses "
                  f"{stats.get('misses')} hit ratio {hr:.3f}, {stats.get('bytes_decompressed', 0) / 1e6:.1f} MB "
                  f"decoded for {total / 1e6:.1f} MB read")


    if FUSE_IMAGE.exists():
        print(f"\n== {FUSE_IMAGE} (bench_fuse's lz4hc image): {FUSE_IMAGE.stat().st_size / 1e6:.1f} MB image")
        read_figures(FUSE_IMAGE)


if __name__ == "__main__":
    main(sys.argv[1:])
