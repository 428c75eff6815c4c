"""FUSE-mode benchmark (issue 19): our pyfuse3 daemon vs the kernel's erofs (loop mount), erofsfuse
and squashfuse, for every compression the format has.

Figures, not pass/fail.  Needs root (loop mounts, drop_caches), mkfs.erofs, mksquashfs, squashfuse.

    python -m bench fuse     (or: python -m bench.bench_fuse [--runs 5] [--only lz4hc,zstd] [--workloads big])

The tree (built once into bench/work/fuse/): ``/usr/lib/python3*``, ``/usr/share/man`` and
``/usr/include`` of this machine (~34k files on Debian 12) plus one big file, ``big.bin``: the largest
ELF file under /usr between 20 and 160 MB (its name is printed), else ~100 MB of the tree's own larger
files concatenated.  Images of it:

    uncompressed, lz4hc   Debian's mkfs.erofs (1.5), ``-T0`` [``-zlz4hc``]
    lzma, deflate, zstd   a newer mkfs.erofs ($EROFS_MKFS_NEW, default /opt/erofs-utils/bin/mkfs.erofs;
                          Debian 12's 1.5 has none of them): ``-zlzma`` / ``-zdeflate`` / ``-zzstd``
    squashfs              mksquashfs with the matching compressor (none, lz4 -Xhc, xz, gzip, zstd)

Targets: ``kernel`` (``mount -o loop,ro``; the reference), ``ours`` (``erofs_mount.backends.fuse``,
default options), ``erofsfuse`` (erofs-utils' FUSE daemon: $EROFSFUSE, default
/opt/erofs-utils/bin/erofsfuse; Debian 12 ships none, so the column is skipped with the reason when
absent), ``squashfuse`` (Debian's, over the squashfs of the same tree); ``--plain`` adds our daemon
with ``-o accel=none`` (the request path without accelerators).  Every run mounts afresh, drops the
page, dentry and inode caches and runs one workload; the targets take turns within each run, so load
drifting on a shared machine hits them alike:

    big      read big.bin (1 MiB reads)
    bigcat   read big.bin in 128 KiB reads, as cat does (the kernel's read-ahead then sends
             READs that do not start at multiples of 1 MiB; the kernel's own mount is slower too)
    lstat    lstat every path (scandir walk)
    readall  read every regular file (1 MiB reads)

Printed: medians of ``--runs`` runs with their ratio to the kernel (kernel time / time: 1.0 = as fast
as the kernel, higher is better), and our daemon's peak RSS (VmHWM, with its decoder process).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = sys.executable
BIG_NAME = "big.bin"
BIG_SIZE = 100 * 1024 * 1024
TREE_SOURCES = ("/usr/lib/python3*", "/usr/share/man", "/usr/include")
MKFS_NEW = os.environ.get("EROFS_MKFS_NEW", "/opt/erofs-utils/bin/mkfs.erofs")
EROFSFUSE = os.environ.get("EROFSFUSE", "/opt/erofs-utils/bin/erofsfuse")
COMPRESSIONS = ("uncompressed", "lz4hc", "lzma", "deflate", "zstd")
# compression -> (mkfs.erofs, its -z argument or None), mksquashfs arguments
EROFS_ARGS = {"uncompressed": ("mkfs.erofs", None), "lz4hc": ("mkfs.erofs", "lz4hc"),
              "lzma": (MKFS_NEW, "lzma"), "deflate": (MKFS_NEW, "deflate"), "zstd": (MKFS_NEW, "zstd")}
SQUASH_ARGS = {"uncompressed": ["-noI", "-noD", "-noF", "-noX"], "lz4hc": ["-comp", "lz4", "-Xhc"],
               "lzma": ["-comp", "xz"], "deflate": ["-comp", "gzip"], "zstd": ["-comp", "zstd"]}


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


# ------------------------------------------------------------------ preparation
def _tool(path: str) -> str | None:
    return path if os.path.sep in path and os.access(path, os.X_OK) else shutil.which(path)


def build_tree(work: str) -> str:
    import glob

    tree = os.path.join(work, "tree-bar")
    if os.path.exists(os.path.join(tree, BIG_NAME)):
        return tree
    tmp = tree + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for pattern in TREE_SOURCES:
        for src in sorted(glob.glob(pattern)):
            dest = os.path.join(tmp, src.strip("/").replace("/", "_"))
            print(f"copying {src} -> {dest}", flush=True)
            sh("cp", "-a", src, dest)
    elf = largest_elf()
    if elf:
        print(f"big file: {elf} ({os.path.getsize(elf) >> 20} MiB)", flush=True)
        shutil.copyfile(elf, os.path.join(tmp, BIG_NAME))
    else:
        print("big file: no ELF of 20-160 MB under /usr: ~100 MB of the tree's larger files", flush=True)
        make_big(tmp, os.path.join(tmp, BIG_NAME))
    os.rename(tmp, tree)
    return tree


def largest_elf(root: str = "/usr", lo: int = 20 << 20, hi: int = 160 << 20) -> str | None:
    best = (0, None)
    for d, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            try:
                if os.path.islink(p) or not lo <= os.path.getsize(p) <= hi or os.path.getsize(p) <= best[0]:
                    continue
                with open(p, "rb") as f:
                    if f.read(4) == b"\x7fELF":
                        best = (os.path.getsize(p), p)
            except OSError:
                continue
    return best[1]


def prepare(work: str, only: tuple[str, ...] = COMPRESSIONS) -> tuple[dict[str, str], dict[str, str]]:
    """The images: ({erofs-COMP|squashfs-COMP: path}, {COMP: why it is missing})."""
    os.makedirs(work, exist_ok=True)
    tree = build_tree(work)
    out, missing = {}, {}
    for comp in only:
        mkfs, z = EROFS_ARGS[comp]
        tool = _tool(mkfs)
        path = os.path.join(work, f"bar-{comp}.erofs")
        if not os.path.exists(path):
            if tool is None:
                missing[comp] = f"no {mkfs} (set EROFS_MKFS_NEW to a mkfs.erofs >= 1.8)"
                continue
            print(f"building {path}", flush=True)
            t = time.monotonic()
            res = subprocess.run([tool, "--quiet", "-T0", *([f"-z{z}"] if z else []), path + ".tmp", tree],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if res.returncode != 0 or not os.path.getsize(path + ".tmp"):
                missing[comp] = f"{mkfs} -z{z} failed: {res.stderr.strip()[-200:]}"
                continue
            os.rename(path + ".tmp", path)
            print(f"  {time.monotonic() - t:.0f} s, {os.path.getsize(path) >> 20} MiB", flush=True)
        out[f"erofs-{comp}"] = path
        sq = os.path.join(work, f"bar-{comp}.squashfs")
        if not os.path.exists(sq):
            print(f"building {sq}", flush=True)
            sh("mksquashfs", tree, sq + ".tmp", "-quiet", "-no-progress", "-noappend", *SQUASH_ARGS[comp],
               stdout=subprocess.DEVNULL)
            os.rename(sq + ".tmp", sq)
        out[f"squashfs-{comp}"] = sq
    return out, missing


def make_big(tree_src: str, dest: str) -> None:
    """~100 MB of real (mixed compressibility) bytes: the tree's largest files, concatenated."""
    files = []
    for root, _dirs, names in os.walk(tree_src):
        for n in names:
            p = os.path.join(root, n)
            if os.path.isfile(p) and not os.path.islink(p):
                files.append((os.path.getsize(p), p))
    files.sort(reverse=True)
    written = 0
    with open(dest, "wb") as out:
        while written < BIG_SIZE:
            for _size, p in files:
                with open(p, "rb") as f:
                    data = f.read(BIG_SIZE - written)
                out.write(data)
                written += len(data)
                if written >= BIG_SIZE:
                    break


# ------------------------------------------------------------------ mounts
def find_pids(needle: str) -> list[int]:
    """The processes serving ``needle``: each daemon first, then the decoder process it forked
    (same command line; backends/fuse/accel/decoder.py)."""
    pids = _named(needle)
    parents = [p for p in pids if _ppid(p) not in pids]
    return parents + [p for p in pids if p not in parents]


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _named(needle: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(needle) in args:
            pids.append(int(entry))
    return pids


def peak_rss_mb(pids) -> float:
    """Peak RSS of the daemon plus its decoder process (their shared pages counted twice)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
    return total or float("nan")


class Mount:
    def __init__(self, kind: str, image: str, mnt: str) -> None:
        self.kind, self.image, self.mnt = kind, image, mnt
        self.pid: int | None = None
        self.pids: list[int] = []

    def __enter__(self) -> "Mount":
        os.makedirs(self.mnt, exist_ok=True)
        if self.kind == "kernel":
            sh("mount", "-t", "erofs", "-o", "loop,ro", self.image, self.mnt)
        elif self.kind in ("ours", "ours-plain", "ours-nopoll") or self.kind.startswith("ours:"):
            extra = {"ours": [], "ours-plain": ["-o", "accel=none"], "ours-nopoll": ["-o", "poll_us=0"]}.get(
                self.kind, ["-o", self.kind.removeprefix("ours:")])
            sh(PY, "-m", "erofs_mount.backends.fuse.lifecycle", "--log-file", os.path.join(
                os.path.dirname(self.image), "fuse.log"), *extra, self.image, self.mnt, cwd=REPO)
            self.pids = find_pids(self.mnt)
            self.pid = self.pids[0] if self.pids else None
        elif self.kind in ("squashfuse", "erofsfuse"):
            sh(self.kind if self.kind == "squashfuse" else EROFSFUSE, self.image, self.mnt,
               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(100):   # bounded: erofsfuse daemonizes before the mount is there
                if os.path.ismount(self.mnt):
                    break
                time.sleep(0.05)
            self.pids = find_pids(self.mnt)
            self.pid = self.pids[0] if self.pids else None
        return self

    def __exit__(self, *exc) -> None:
        cmd = ["umount", self.mnt] if self.kind == "kernel" else ["fusermount3", "-u", "-q", self.mnt]
        for _ in range(20):  # bounded: a just-closed file can keep the mount busy for a moment
            if subprocess.run(cmd, check=False, stderr=subprocess.DEVNULL).returncode == 0:
                break
            time.sleep(0.25)
        else:
            subprocess.run(["umount", "-l", self.mnt], check=False)
        for _ in range(100):  # bounded: 10 s for the daemon to go
            if self.pid is None or not os.path.exists(f"/proc/{self.pid}"):
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, 9)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# ------------------------------------------------------------------ workloads
def w_big(root: str, bufsize: int = 1 << 20) -> int:
    n = 0
    with open(os.path.join(root, BIG_NAME), "rb", buffering=0) as f:
        while chunk := f.read(bufsize):
            n += len(chunk)
    return n


def w_bigcat(root: str) -> int:
    return w_big(root, 128 * 1024)    # coreutils cat's buffer (io_blksize: 128 KiB)


def _walk(root: str):
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                yield e
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)


def w_lstat(root: str) -> int:
    n = 0
    for e in _walk(root):
        os.lstat(e.path)
        n += 1
    return n


def w_readall(root: str) -> int:
    n = 0
    for e in _walk(root):
        if e.is_file(follow_symlinks=False):
            try:
                with open(e.path, "rb", buffering=0) as f:
                    while chunk := f.read(1 << 20):
                        n += len(chunk)
            except PermissionError:
                pass
    return n


WORKLOADS = {"big": w_big, "bigcat": w_bigcat, "lstat": w_lstat, "readall": w_readall}


def measure_once(kind: str, image: str, mnt: str, workload: str) -> tuple[float, float | None, int]:
    with Mount(kind, image, mnt) as m:
        drop_caches()
        t = time.perf_counter()
        result = WORKLOADS[workload](mnt)
        elapsed = time.perf_counter() - t
        rss = peak_rss_mb(m.pids) if m.pids else None
    return elapsed, rss, result


def measure_round_robin(targets, mnt: str, workload: str, runs: int, errors: dict) -> dict:
    """Medians per target; the targets take turns in every run, so drift on a shared machine hits all
    alike.  A target that fails is dropped with its error in ``errors``."""
    times: dict = {kind: [] for kind, _ in targets}
    rss: dict = {kind: None for kind, _ in targets}
    result: dict = {}
    live = list(targets)
    for _ in range(runs):
        for kind, image in list(live):
            try:
                elapsed, peak, n = measure_once(kind, image, mnt, workload)
            except (OSError, subprocess.CalledProcessError) as exc:
                err = getattr(exc, "stderr", None)
                errors[kind] = (err.decode(errors="replace") if isinstance(err, bytes) else err or str(exc)).strip()
                live.remove((kind, image))
                continue
            times[kind].append(elapsed)
            if peak is not None:
                rss[kind] = max(rss[kind] or 0, peak)
            result[kind] = n
    return {kind: (statistics.median(times[kind]), rss[kind], result[kind]) for kind, _ in live}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--work", default=os.path.join(REPO, "bench", "work", "fuse"))
    p.add_argument("--only", default=",".join(COMPRESSIONS), help="compressions, comma-separated")
    p.add_argument("--workloads", default="big,bigcat,lstat,readall")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--plain", action="store_true", help="add our daemon with -o accel=none")
    p.add_argument("--also", action="append", default=[], metavar="OPTS",
                   help="add our daemon with -o OPTS (repeatable), e.g. --also accel=-readnext")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_fuse: needs root (loop mounts, drop_caches)", file=sys.stderr)
        return 2
    for tool in ("mkfs.erofs", "mksquashfs", "squashfuse", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"bench_fuse: {tool} not installed", file=sys.stderr)
            return 2
    only = tuple(c for c in a.only.split(",") if c)
    if set(only) - set(COMPRESSIONS):
        print(f"bench_fuse: --only takes {', '.join(COMPRESSIONS)}", file=sys.stderr)
        return 2
    imgs, missing = prepare(a.work, only)
    if a.prepare_only:
        return 0
    eu = _tool(EROFSFUSE)
    eu_why = None if eu else f"{EROFSFUSE} not found (set EROFSFUSE to an erofsfuse built from erofs-utils >= 1.9)"
    mnt = os.path.join(a.work, "mnt")
    rows, errors = [], {}
    t0 = time.monotonic()
    for comp in only:
        if comp in missing:
            continue
        targets = [("kernel", imgs[f"erofs-{comp}"]), ("ours", imgs[f"erofs-{comp}"])]
        if a.plain:
            targets.append(("ours-plain", imgs[f"erofs-{comp}"]))
        targets += [(f"ours:{o}", imgs[f"erofs-{comp}"]) for o in a.also]
        if eu:
            targets.append(("erofsfuse", imgs[f"erofs-{comp}"]))
        targets.append(("squashfuse", imgs[f"squashfs-{comp}"]))
        for wl in a.workloads.split(","):
            errs: dict = {}
            res = measure_round_robin(targets, mnt, wl, a.runs, errs)
            for kind, err in errs.items():
                errors.setdefault((comp, kind), err)
            for kind, (med, rss, n) in res.items():
                print(f"  {comp:12} {wl:8} {kind:10} {med:8.3f} s  ({n} {'paths' if wl == 'lstat' else 'bytes'})"
                      + (f"  peak RSS {rss:.0f} MB" if rss else ""), flush=True)
            rows.append((comp, wl, res))
    kinds = [k for k in ("ours", "ours-plain", *(f"ours:{o}" for o in a.also), "erofsfuse", "squashfuse")
             if any(k in r for _c, _w, r in rows)]
    print(f"\n{a.runs} cold-cache runs per figure (medians), {time.monotonic() - t0:.0f} s, "
          f"load average {os.getloadavg()[0]:.2f}; ratio = kernel time / time (1.0 = the kernel, higher is better)")
    print(f"{'image':12} {'workload':8} {'kernel s':>9} " + " ".join(f"{k + ' s':>13} {'ratio':>6}" for k in kinds)
          + f" {'our RSS MB':>10}")
    for comp, wl, res in rows:
        if "kernel" not in res:
            continue
        k = res["kernel"][0]
        cells = [f"{res[x][0]:13.3f} {k / res[x][0]:6.2f}" if x in res else f"{'-':>13} {'-':>6}" for x in kinds]
        rss = res.get("ours", (0, None))[1]
        print(f"{comp:12} {wl:8} {k:9.3f} " + " ".join(cells) + f" {(f'{rss:.0f}' if rss else '-'):>10}")
    for comp, why in missing.items():
        print(f"{comp}: not measured: {why}")
    if eu_why:
        print(f"erofsfuse: not measured: {eu_why}")
    for (comp, kind), err in errors.items():
        print(f"{comp} {kind}: failed: {err.splitlines()[-1] if err else '?'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
