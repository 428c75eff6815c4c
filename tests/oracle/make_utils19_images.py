"""Regenerate tests/data/oracle/: small images made by a newer mkfs.erofs (1.9.x) for features 1.5 cannot make.

Not a test.  Usage (root, with a locally built mkfs.erofs 1.9.x; nothing here builds it):

    python -m tests.oracle.make_utils19_images /path/to/mkfs.erofs

It builds the treegen "small" tree (seed 7, 255-byte names), one image per
configuration below, mounts each read-only with the host kernel and stores the
kernel's records next to the gzipped image (``NAME.json.gz``: the mkfs arguments,
the tree seed/profile, the kernel release, ``records.kernel_records`` and statfs),
so tests can compare our reader with the kernel's view even where no kernel can
mount (and, where one can, with a live mount as well).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.oracle import kmount, records, treegen

OUT = Path(__file__).resolve().parents[1] / "data" / "oracle"
SEED = 7
T = "1700000000"

CONFIGS = {
    "48bit-plain": ["-E48bit"],
    "blk512": ["-b512"],
    "blk1024-xprefix-packed": ["-b1024", "--xattr-prefix=user.k", "--xattr-prefix=trusted.overlay."],
    "blk2048-xprefix-plain": ["-b2048", "--xattr-prefix=user.k", "-Eplain-xattr-prefixes"],
    "dot-omitted": ["-Edot-omitted"],
    "metabox-shared-xattrs": ["-m4096", "-x1"],
    "metabox-lz4-xprefix": ["-zlz4hc", "-m4096:lz4", "-x1", "--xattr-prefix=user.k"],
    "metazone": ["--MZ", "-x1"],
    "48bit-chunk-indexes": ["-E48bit", "--chunksize=8192", "-Eforce-chunk-indexes"],
    "48bit-chunk-blobdev": ["-E48bit", "--chunksize=4096", "--blobdev={blob}"],
    "blk1024-fragments-dedupe-lz4hc": ["-b1024", "-zlz4hc", "-Efragments,dedupe"],
    "all-fragments-lzma": ["-zlzma", "-Eall-fragments,fragdedupe=full"],
    "48bit-zstd-ztailpacking": ["-zzstd", "-E48bit,ztailpacking"],
    "blk2048-deflate-zdirs": ["-b2048", "-zdeflate", "--zD"],
    "namefilter-nosbcrc-label": ["-Exattr-name-filter,nosbcrc", "-x1", "-Lo-racle", "--root-xattr-isize=256"],
}


HUGE = 6 << 30
HUGE_PIECES = ((0, b"head"), ((4 << 30) + 5, b"mid"), (HUGE - 8, b"TAILDATA"))
HUGE_OFFSETS = (0, (1 << 31), (4 << 30) - 1, (4 << 30), (4 << 30) + 3, HUGE - 20, HUGE - 1)


def _huge_sparse(mkfs: str, version: str, work: Path) -> None:
    """A 6 GiB sparse file in 64 KiB chunks with 48-bit indexes: i_size and chunk positions past 2^32."""
    src = work / "huge-src"
    src.mkdir()
    with open(src / "huge", "wb") as f:
        f.truncate(HUGE)
        for off, data in HUGE_PIECES:
            f.seek(off)
            f.write(data)
    os.utime(src / "huge", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    image = work / "huge-sparse-48bit-chunks.erofs"
    args = ["-T" + T, "-E48bit", "--chunksize=65536"]
    subprocess.run([mkfs, "--quiet", *args, str(image), str(src)], check=True, timeout=300)
    with kmount.kernel_mount(image, work / "mnt-huge") as mnt:
        st = os.lstat(os.path.join(mnt, "huge"))
        fd = os.open(os.path.join(mnt, "huge"), os.O_RDONLY)
        try:
            reads = {str(off): os.pread(fd, 64, off).hex() for off in HUGE_OFFSETS}
        finally:
            os.close(fd)
        ino = st.st_ino
    with open(image, "rb") as i, gzip.GzipFile(OUT / (image.name + ".gz"), "wb", 9, mtime=0) as o:
        shutil.copyfileobj(i, o)
    (OUT / "huge-sparse.json").write_text(json.dumps(
        {"mkfs": version, "args": args, "kernel": os.uname().release, "path": "/huge",
         "st_size": st.st_size, "st_blocks": st.st_blocks, "st_ino": ino, "reads64": reads}, indent=1) + "\n")


def main(mkfs: str) -> int:
    reason = kmount.kernel_unavailable_reason()
    if reason:
        print(f"cannot generate: {reason}", file=sys.stderr)
        return 1
    version = subprocess.run([mkfs, "-V"], capture_output=True, text=True, timeout=10).stdout.strip()
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="oracle-gen-"))
    index = []
    try:
        src = work / "src"
        src.mkdir()
        treegen.build_tree(str(src), seed=SEED, profile="small", max_name=255)
        for name, cfg in CONFIGS.items():
            image, blob = work / f"{name}.erofs", work / f"{name}.blob"
            args = [a.format(blob=blob) for a in cfg]
            r = subprocess.run([mkfs, "--quiet", "-T" + T, "--mkfs-time", "-U", "6f726163-6c65-4000-8000-000000000007",
                                *args, str(image), str(src)], capture_output=True, text=True, timeout=300)
            if r.returncode:
                print(f"{name}: mkfs failed: {r.stderr.strip()[-500:]}", file=sys.stderr)
                continue
            devices = [blob] if blob.exists() else []
            try:
                with kmount.kernel_mount(image, work / "mnt", devices) as mnt:
                    base, extra = records.kernel_records(mnt)
                    statfs = records.kernel_statfs(mnt)
            except RuntimeError as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                continue
            files = []
            for f in [image, *devices]:
                with open(f, "rb") as i, gzip.GzipFile(OUT / (f.name + ".gz"), "wb", 9, mtime=0) as o:
                    shutil.copyfileobj(i, o)
                files.append(f.name)
            manifest = {"name": name, "mkfs": version, "args": ["-T" + T, "--mkfs-time", *cfg],
                        "tree": {"generator": "tests/oracle/treegen.py build_tree", "seed": SEED,
                                 "profile": "small", "max_name": 255},
                        "kernel": os.uname().release, "statfs": statfs, "entries": base, "extra": extra}
            with gzip.GzipFile(OUT / f"{name}.json.gz", "wb", 9, mtime=0) as o:
                o.write(json.dumps(manifest, sort_keys=True).encode())
            index.append({"name": name, "image": files[0], "devices": files[1:], "manifest": f"{name}.json.gz"})
            print(f"{name}: {len(base)} paths")
        (OUT / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        _huge_sparse(mkfs, version, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
