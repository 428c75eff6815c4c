"""Extract throughput: `erofs-mount extract` vs Debian's `fsck.erofs --extract` on one ~200 MB image.

The image is an uncompressed EROFS (~200 MB) (Debian mkfs.erofs) of a copy of this machine's Python
libraries; both extractors run on the same image, alternately, several times; the image stays
in the page cache (warm) so the figures compare the extractors' own work.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
from pathlib import Path

from bench.common import build_image, timed

WORK = Path(os.environ.get("BENCH_WORK", Path(__file__).parent / "work"))
_PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"
SOURCES = ["/usr/lib/python3.11", "/usr/lib/python3/dist-packages",
           str(Path(sys.prefix) / "lib" / _PYVER / "site-packages"),
           str(Path(sys.base_prefix) / "lib" / _PYVER)]
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


def build_tree(target: Path, target_mb: int = 200) -> Path:
    if target.exists():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = 0
    for i, src in enumerate(SOURCES):
        if not os.path.isdir(src) or total >= target_mb << 20:
            continue
        shutil.copytree(src, tmp / f"part{i}", symlinks=True, ignore_dangling_symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "site-packages", "*.so"))
        total = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file() and not f.is_symlink())
    tmp.rename(target)
    return target


def main(argv: list[str]) -> None:
    if not shutil.which("fsck.erofs") or not shutil.which("mkfs.erofs"):
        print("erofs-utils not installed: skipped")
        return
    WORK.mkdir(parents=True, exist_ok=True)
    tree = build_tree(WORK / "pytree")
    image = build_image(tree, WORK / "pytree-plain.erofs")
    size = image.stat().st_size
    data = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file() and not f.is_symlink())
    files = sum(1 for _ in tree.rglob("*"))
    print(f"image {image.name}: {size / 1e6:.0f} MB, {files} paths, {data / 1e6:.0f} MB of file data")
    erofs_mount = str(Path(sys.executable).with_name("erofs-mount"))
    # extract to tmpfs when there is one: the figures then compare the extractors, not ext4's journal
    shm = Path("/dev/shm")
    dest = (shm / "erofs-mount-bench-out") if shm.is_dir() and os.access(shm, os.W_OK) else WORK / "out"
    ours = [erofs_mount, "extract", "--no-progress", str(image), str(dest)]
    theirs = ["fsck.erofs", f"--extract={dest}", "--overwrite", str(image)]
    timed(theirs, dest)  # warm the page cache
    t_ours, t_theirs = [], []
    for _ in range(RUNS):
        t_theirs.append(timed(theirs, dest))
        t_ours.append(timed(ours, dest))
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    print(f"{'extractor':<28}{'median s':>10}{'MB/s':>10}")
    print(f"{'erofs-mount extract':<28}{mo:>10.2f}{data / mo / 1e6:>10.1f}")
    print(f"{'fsck.erofs --extract (1.5)':<28}{mt:>10.2f}{data / mt / 1e6:>10.1f}")
    print(f"ratio erofs-mount / fsck.erofs throughput: {mt / mo:.2f}x  (runs: {RUNS})")


if __name__ == "__main__":
    main(sys.argv[1:])
