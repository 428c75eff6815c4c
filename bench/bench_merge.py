"""Whole-image merge, FUSE mode on the host (issue 18): lstat every path and read every file of the
merged mount (`erofs-mount --mode fuse REF MNT`, no oci.layer) beside the kernel's overlayfs over
loop mounts of the same EROFS layers, with the single-layer figures next to them.  Figures, not
pass/fail.  Needs root (loop and overlay mounts, drop_caches, trusted.* xattrs), /dev/fuse,
docker-registry and Debian's mkfs.erofs (1.5).

The layers are built once into bench/work/merge/ (git-ignored): a base that copies this machine's
/usr/lib/python3, /usr/lib/python3.11 and /usr/share/man (~125 MB of data, ~29k paths), then three small
layers: (1) files modified and a new tree added, (2) files and a whole directory deleted (overlayfs
whiteouts: character devices 0/0), files of layer 1 deleted, more added, (3) a directory made opaque
(``trusted.overlay.opaque=y``) with new files in it, files modified again, deleted files re-created.
Each layer is an uncompressed and an lz4hc (``-zlz4hc``) EROFS image; each variant is pushed as one
image into docker-registry on 127.0.0.1 (storage in bench/work/merge/storage).

Every round, with a fresh mount and the page, dentry and inode caches dropped before each workload
(``lstat``: lstat every path of a scandir walk; ``readall``: read every regular file), the mounts
take turns:

    overlay      mount -t overlay -o ro,lowerdir=L3:L2:L1:L0,xino=on over loop mounts of the layers
    merged       erofs-mount --mode fuse -o oci.insecure,oci.cache=DIR REF MNT
    loop         the base layer alone, mount -t erofs -o loop,ro
    single       erofs-mount --mode fuse -o oci.insecure,oci.cache=DIR,oci.layer=0 REF MNT

(``BENCH_FUSE_OPTS=accel=-readnext`` appends options to both FUSE mounts' -o.)
A warm-up pass first fills the persistent blob cache (oci.cache) with what both FUSE mounts read,
so the timed rounds measure the merge and FUSE, not the network (the bytes the daemons still fetch
are printed); it also compares the merged FUSE tree with the overlay tree (path, type, size of
regular files) and prints the number of mismatches.  Medians; ratios are kernel time / FUSE time
(1.0 = as fast as the kernel, higher is better) and the time each side pays for merging.

    make bench BENCH_ARGS=merge     (or: python -m bench.bench_merge [--rounds 5] [--only plain|lz4hc])
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import stat
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

from bench.bench_fuse import Mount, _walk, drop_caches, w_lstat, w_readall  # noqa: E402
from bench.bench_fuse_oci import _daemons, _published  # noqa: E402

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
MKFS = "/usr/bin/mkfs.erofs"
EROFS = "application/vnd.erofs"
BASE_TREES = ("usr/lib/python3", "usr/lib/python3.11", "usr/share/man")
VARIANTS = {"plain": (), "lz4hc": ("-zlz4hc",)}
KINDS = ("overlay", "merged", "loop", "single")
WORKLOADS = {"lstat": w_lstat, "readall": w_readall}
MiB = 1 << 20


# ------------------------------------------------------------------------------------ the layers
def _regular_files(root: Path) -> list[str]:
    return sorted(os.path.relpath(e.path, root) for e in _walk(str(root)) if e.is_file(follow_symlinks=False))


def _dir_in(layer: Path, base: Path, rel: str) -> Path:
    """``rel``'s directory in ``layer``, made with the base layer's modes for the parents it lacks."""
    parts = Path(rel).parts
    for i in range(1, len(parts) + 1):
        d = layer.joinpath(*parts[:i])
        if not d.exists():
            d.mkdir()
            src = base.joinpath(*parts[:i])
            if src.is_dir():
                shutil.copystat(src, d)
    return layer / rel


def _whiteout(layer: Path, base: Path, rel: str) -> None:
    p = _dir_in(layer, base, os.path.dirname(rel)) / os.path.basename(rel)
    os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _add_tree(layer: Path, base: Path, rel: str, n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    d = _dir_in(layer, base, rel)
    names = []
    for i in range(n):
        sub = d / f"d{i % 8}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:04}.bin").write_bytes(rnd.randbytes(rnd.choice((0, 100, 3000, 20000, 150000))))
        names.append(f"{rel}/d{i % 8}/f{i:04}.bin")
    return names


def build_layers(src: Path) -> list[Path]:
    """The four layer directories under ``src`` (built once; a half-built set is rebuilt)."""
    layers = [src / f"L{i}" for i in range(4)]
    if (src / "done").exists():
        return layers
    shutil.rmtree(src, ignore_errors=True)
    base = layers[0]
    for rel in BASE_TREES:
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", "/" + rel, str(base / rel)], check=True, timeout=600)
    regs = _regular_files(base)
    dirs = sorted(os.path.relpath(e.path, base) for e in _walk(str(base)) if e.is_dir(follow_symlinks=False))
    l1, l2, l3 = layers[1:]
    for d in layers[1:]:
        d.mkdir()
        shutil.copystat(base, d)
    # layer 1: every 97th file modified, a new tree
    modified = regs[::97]
    for rel in modified:
        data = (base / rel).read_bytes()
        (_dir_in(l1, base, os.path.dirname(rel)) / os.path.basename(rel)).write_bytes(
            b"modified by layer 1\n" + data[: len(data) // 2])
    added1 = _add_tree(l1, base, "usr/share/merge-bench/l1", 400, 1)
    # layer 2: every 53rd file deleted, one whole directory, some of layer 1's files; a new tree
    deleted = [r for r in regs[7::53] if r not in modified] + modified[::5] + added1[::10]
    gone_dir = next((d for d in ("usr/lib/python3.11/email", "usr/share/man/fr") if d in dirs), dirs[-1])
    deleted = [r for r in deleted if not r.startswith(gone_dir + "/")]
    for rel in deleted + [gone_dir]:
        _whiteout(l2, base, rel)
    _add_tree(l2, base, "usr/share/merge-bench/l2", 200, 2)
    # layer 3: one directory opaque (with new files), files modified again, deleted files re-created
    opaque = next((d for d in ("usr/share/man/de", "usr/share/man/man5") if d in dirs), dirs[1])
    od = _dir_in(l3, base, opaque)
    os.setxattr(od, b"trusted.overlay.opaque", b"y")
    _add_tree(l3, base, opaque, 50, 3)
    for rel in [r for r in regs[3::89] if not r.startswith(opaque + "/")] + deleted[:20]:
        p = _dir_in(l3, base, os.path.dirname(rel)) / os.path.basename(rel)
        if not p.exists():
            p.write_bytes(b"layer 3 was here\n" * 40)
    _add_tree(l3, base, "usr/share/merge-bench/l3", 200, 4)
    (src / "done").write_text(f"{len(regs)} base files, {len(modified)} modified, {len(deleted)} deleted, "
                              f"{gone_dir} deleted, {opaque} opaque\n")
    return layers


def build_images(work: Path, variant: str) -> list[Path]:
    layers = build_layers(work / "src")
    out = []
    for i, layer in enumerate(layers):
        img = work / variant / f"layer{i}.erofs"
        if not img.exists():
            img.parent.mkdir(parents=True, exist_ok=True)
            t = time.monotonic()
            subprocess.run([MKFS, "--quiet", *VARIANTS[variant], f"{img}.tmp", str(layer)], check=True,
                           stdout=subprocess.DEVNULL, timeout=1800)
            os.rename(f"{img}.tmp", img)
            print(f"built {img.relative_to(REPO)}: {img.stat().st_size / MiB:.1f} MiB "
                  f"in {time.monotonic() - t:.0f} s", flush=True)
        out.append(img)
    return out


# ------------------------------------------------------------------------------------ mounts
def _fuse_umount(mnt: Path) -> None:
    for _ in range(20):  # bounded: a just-closed file can keep the mount busy for a moment
        r = subprocess.run([PY, "-m", "erofs_mount", "-u", str(mnt)], env=ENV, cwd=REPO, capture_output=True,
                           timeout=120)
        if r.returncode == 0 or not _is_mounted(mnt):
            break
        time.sleep(0.25)
    else:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=60)
    for _ in range(200):  # bounded: 10 s for the daemon (and its decoder) to end
        if not _daemons(mnt):
            return
        time.sleep(0.05)
    for pid in _daemons(mnt):  # our own daemons, by pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _mountinfo() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def _is_mounted(path: Path) -> bool:
    return str(path) in _mountinfo()


class _Mounted(Mount):
    """A mount made already: only the bounded unmount of bench_fuse.Mount."""

    def __enter__(self) -> "_Mounted":
        return self


@contextlib.contextmanager
def mounted(kind: str, images: list[Path], ref: str, cache: Path, tmp: Path):
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    if kind == "loop":
        with Mount("kernel", str(images[0]), str(mnt)):
            yield mnt
    elif kind == "overlay":
        with contextlib.ExitStack() as stack:
            lowers = []
            for i, img in enumerate(images):
                stack.enter_context(Mount("kernel", str(img), str(tmp / f"lower{i}")))
                lowers.append(str(tmp / f"lower{i}"))
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            "ro,xino=on,lowerdir=" + ":".join(reversed(lowers)), str(mnt)], check=True, timeout=60)
            stack.enter_context(_Mounted("kernel", "", str(mnt)))
            yield mnt
    else:
        opts = f"oci.insecure,oci.cache={cache}" + (",oci.layer=0" if kind == "single" else "")
        opts += "," + os.environ["BENCH_FUSE_OPTS"] if os.environ.get("BENCH_FUSE_OPTS") else ""
        r = subprocess.run([PY, "-m", "erofs_mount", "--mode", "fuse", "-o", opts, ref, str(mnt)], env=ENV, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            _fuse_umount(mnt)
            raise RuntimeError(f"erofs-mount {kind} failed: {r.stderr.strip()}")
        try:
            yield mnt
        finally:
            _fuse_umount(mnt)


def measure(kind: str, workload: str, images, ref, cache, tmp, fetched: list | None = None) -> tuple[float, int]:
    with mounted(kind, images, ref, cache, tmp) as root:
        drop_caches()
        t0 = time.perf_counter()
        n = WORKLOADS[workload](str(root))
        dt = time.perf_counter() - t0
        if fetched is not None and kind in ("merged", "single"):
            fetched.append(_published(root, time.time()).get("bytes_fetched"))
    return dt, n


def listing(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for e in _walk(str(root)):
        st = e.stat(follow_symlinks=False)
        out[os.path.relpath(e.path, root)] = (stat.S_IFMT(st.st_mode), st.st_size if stat.S_ISREG(st.st_mode) else 0)
    return out


def compare_trees(images, ref, cache, tmp) -> None:
    with mounted("merged", images, ref, cache, tmp) as root:
        w_readall(str(root))  # warm-up: the blob cache gets every byte the merged tree reads
        fuse = listing(root)
    with mounted("single", images, ref, cache, tmp) as root:
        w_readall(str(root))
        listing(root)
    with mounted("overlay", images, ref, cache, tmp) as root:
        kern = listing(root)
    bad = sorted(p for p in fuse.keys() | kern.keys() if fuse.get(p) != kern.get(p))
    print(f"  merged FUSE tree {len(fuse)} paths, overlay tree {len(kern)} paths: {len(bad)} mismatches"
          + (f", e.g. {[(p, fuse.get(p), kern.get(p)) for p in bad[:5]]}" if bad else ""), flush=True)


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_merge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", choices=tuple(VARIANTS))
    ap.add_argument("--workloads", default="lstat,readall")
    args = ap.parse_args(argv)

    from tests.oci._servers import REGISTRY_BIN, Pusher, start_registry

    if os.geteuid() != 0 or REGISTRY_BIN is None or not os.access(MKFS, os.X_OK) or not os.path.exists("/dev/fuse"):
        print("bench_merge skipped: needs root (loop/overlay mounts, drop_caches), /dev/fuse, docker-registry, "
              + MKFS)
        return 0
    work = HERE / "work" / "merge"
    work.mkdir(parents=True, exist_ok=True)
    variants = [args.only] if args.only else list(VARIANTS)
    workloads = args.workloads.split(",")
    images = {v: build_images(work, v) for v in variants}
    print((work / "src" / "done").read_text().strip(), flush=True)
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    reg = start_registry(tmp / "registry", work / "storage")
    times: dict = {}
    counts: dict = {}
    fetched: list = []
    try:
        pusher = Pusher(reg.url)
        try:
            for v in variants:
                pusher.image("bench/merge", v, [(EROFS, img.read_bytes()) for img in images[v]])
        finally:
            pusher.close()
        refs = {v: f"{reg.host}/bench/merge:{v}" for v in variants}
        cache = tmp / "cache"
        for v in variants:
            print(f"{v}: layers {', '.join(f'{i.stat().st_size / MiB:.1f}' for i in images[v])} MiB; warm-up",
                  flush=True)
            compare_trees(images[v], refs[v], cache, tmp)
        for rnd in range(args.rounds):
            for v in variants:
                for wl in workloads:
                    for kind in KINDS:
                        dt, n = measure(kind, wl, images[v], refs[v], cache, tmp, fetched if rnd == 0 else None)
                        times.setdefault((v, wl, kind), []).append(dt)
                        counts[(v, wl, kind)] = n
            print(f"round {rnd + 1}/{args.rounds} done ({time.monotonic() - t_start:.0f} s)", flush=True)
    finally:
        reg.stop()
        for left in sorted((p for p in _mountinfo() if p.startswith(f"{tmp}/")), reverse=True):
            print(f"bench_merge: {left} still mounted: lazy unmount", file=sys.stderr)
            subprocess.run(["umount", "-l", left], check=False, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    _report(variants, workloads, times, counts, fetched, args.rounds)
    print(f"(total {time.monotonic() - t_start:.0f} s after the build)")
    return 0


def _report(variants, workloads, times, counts, fetched, rounds) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'image':6} {'workload':8} {'overlay s':>9} {'merged s':>9} {'ovl/mrg':>8} {'loop s':>8} {'single s':>9}"
          f" {'loop/sgl':>8} {'FUSE mrg/sgl':>12} {'kern ovl/loop':>13}   paths|MiB merged, single")
    for v in variants:
        for wl in workloads:
            o, m, lo, s = (med[(v, wl, k)] for k in KINDS)
            unit = (lambda n: f"{n}") if wl == "lstat" else (lambda n: f"{n / MiB:.0f}")
            print(f"{v:6} {wl:8} {o:9.3f} {m:9.3f} {o / m:8.2f} {lo:8.3f} {s:9.3f} {lo / s:8.2f} {m / s:12.2f} "
                  f"{o / lo:13.2f}   {unit(counts[(v, wl, 'merged')])}, {unit(counts[(v, wl, 'single')])}")
    print(f"(medians of {rounds} cold-cache rounds, fresh mounts; ovl/mrg and loop/sgl: kernel time / FUSE time, "
          "higher is better, 1.0 = kernel;\n FUSE mrg/sgl and kern ovl/loop: merged time / single-layer time on "
          "each side; the merged tree is not the base tree, see the path counts)")
    for v in variants:
        for wl in workloads:
            print(f"  {v} {wl} rounds (s): " + "; ".join(
                f"{k} " + "/".join(f"{t:.2f}" for t in times[(v, wl, k)]) for k in KINDS))
    got = [f for f in fetched if f is not None]
    print(f"bytes the FUSE daemons fetched from the registry in round 1 (blob cache warm): "
          f"{sum(got)} over {len(got)} of {len(fetched)} mounts that published statistics")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
