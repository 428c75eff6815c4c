"""FUSE-mode benchmark: our pyfuse3 daemon vs the kernel's erofs (loop mount) vs squashfuse.

Figures, not pass/fail.  Needs root (loop mounts, drop_caches), mkfs.erofs (Debian
erofs-utils 1.5), mksquashfs and squashfuse.

    python bench/bench_fuse.py [--runs 3] [--work bench/work/fuse] [--tree DIR] [--only uncompressed]

The tree is a copy of this machine's Python installation (``sys.base_prefix``;
~60k files, ~1 GB) plus one ~100 MB file made of the installation's own larger
files, built once into bench/work/fuse/ as an uncompressed and an lz4hc EROFS
image (mkfs.erofs 1.5) and a squashfs of the same tree (uncompressed /
lz4 -Xhc, matching).  Every run mounts afresh, drops the page, dentry and inode
caches (``echo 3 > /proc/sys/vm/drop_caches``) and runs one workload:

    big      read the ~100 MB file
    lstat    lstat every path (scandir walk)
    readall  read every regular file

Medians of ``--runs`` runs are printed with their ratio to the kernel (kernel
time / our time: 1.0 = as fast as the kernel, higher is better), and the
daemon's peak RSS (VmHWM) after the workloads, plus its decoder process's (lz4 images).  The three targets take turns
within every run, so load drifting on a shared machine hits them alike.
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
BIG_NAME = "big-100M.bin"
BIG_SIZE = 100 * 1024 * 1024


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


# ------------------------------------------------------------------ preparation
def prepare(work: str, tree_src: str) -> dict[str, str]:
    os.makedirs(work, exist_ok=True)
    tree = os.path.join(work, "tree")
    if not os.path.exists(os.path.join(tree, BIG_NAME)):
        shutil.rmtree(tree, ignore_errors=True)
        print(f"copying {tree_src} -> {tree}", flush=True)
        sh("cp", "-a", tree_src, tree)
        make_big(tree_src, os.path.join(tree, BIG_NAME))
    images = {
        "erofs-uncompressed": (["mkfs.erofs", "--quiet", "-T0"], "plain.erofs"),
        "erofs-lz4hc": (["mkfs.erofs", "--quiet", "-T0", "-zlz4hc"], "lz4hc.erofs"),
    }
    out = {}
    for kind, (cmd, name) in images.items():
        path = os.path.join(work, name)
        if not os.path.exists(path):
            print(f"building {path}", flush=True)
            t = time.monotonic()
            sh(*cmd, path + ".tmp", tree, stdout=subprocess.DEVNULL)
            os.rename(path + ".tmp", path)
            print(f"  {time.monotonic() - t:.0f} s, {os.path.getsize(path) >> 20} MiB", flush=True)
        out[kind] = path
    squash = {"squashfs-uncompressed": (["-noI", "-noD", "-noF", "-noX"], "plain.squashfs"),
              "squashfs-lz4hc": (["-comp", "lz4", "-Xhc"], "lz4hc.squashfs")}
    for kind, (args, name) in squash.items():
        path = os.path.join(work, name)
        if not os.path.exists(path):
            print(f"building {path}", flush=True)
            sh("mksquashfs", tree, path + ".tmp", "-quiet", "-no-progress", "-noappend", *args,
               stdout=subprocess.DEVNULL)
            os.rename(path + ".tmp", path)
        out[kind] = path
    return out


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
        elif self.kind in ("ours", "ours-nopoll"):
            extra = ["-o", "poll_us=0"] if self.kind == "ours-nopoll" else []
            sh(PY, "-m", "erofs_mount.backends.fuse.lifecycle", "--log-file", os.path.join(
                os.path.dirname(self.image), "fuse.log"), *extra, self.image, self.mnt, cwd=REPO)
            self.pids = find_pids(self.mnt)
            self.pid = self.pids[0] if self.pids else None
        elif self.kind == "squashfuse":
            sh("squashfuse", self.image, self.mnt)
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
def w_big(root: str) -> int:
    n = 0
    with open(os.path.join(root, BIG_NAME), "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            n += len(chunk)
    return n


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


WORKLOADS = {"big": w_big, "lstat": w_lstat, "readall": w_readall}


def measure_once(kind: str, image: str, mnt: str, workload: str) -> tuple[float, float | None, int]:
    with Mount(kind, image, mnt) as m:
        drop_caches()
        t = time.perf_counter()
        result = WORKLOADS[workload](mnt)
        elapsed = time.perf_counter() - t
        rss = peak_rss_mb(m.pids) if m.pids else None
    return elapsed, rss, result


def measure_round_robin(targets, mnt: str, workload: str, runs: int) -> dict:
    """Medians per target; the targets take turns in every run, so drift on a shared machine hits all alike."""
    times: dict = {kind: [] for kind, _ in targets}
    rss: dict = {kind: None for kind, _ in targets}
    result: dict = {}
    for _ in range(runs):
        for kind, image in targets:
            elapsed, peak, n = measure_once(kind, image, mnt, workload)
            times[kind].append(elapsed)
            if peak is not None:
                rss[kind] = max(rss[kind] or 0, peak)
            result[kind] = n
    return {kind: (statistics.median(times[kind]), rss[kind], result[kind]) for kind, _ in targets}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work", default=os.path.join(REPO, "bench", "work", "fuse"))
    p.add_argument("--tree", default=sys.base_prefix, help="tree to copy (default: the Python installation)")
    p.add_argument("--only", choices=("uncompressed", "lz4hc"))
    p.add_argument("--workloads", default="big,lstat,readall")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--no-poll-column", action="store_true",
                   help="skip the extra run of our daemon with busy polling off (-o poll_us=0)")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_fuse: needs root (loop mounts, drop_caches)", file=sys.stderr)
        return 2
    for tool in ("mkfs.erofs", "mksquashfs", "squashfuse", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"bench_fuse: {tool} not installed", file=sys.stderr)
            return 2
    imgs = prepare(a.work, a.tree)
    if a.prepare_only:
        return 0
    mnt = os.path.join(a.work, "mnt")
    rows = []
    for comp in ("uncompressed", "lz4hc"):
        if a.only and a.only != comp:
            continue
        targets = [("kernel", imgs[f"erofs-{comp}"]), ("ours", imgs[f"erofs-{comp}"]),
                   ("squashfuse", imgs[f"squashfs-{comp}"])]
        if not a.no_poll_column:
            targets.insert(2, ("ours-nopoll", imgs[f"erofs-{comp}"]))
        for wl in a.workloads.split(","):
            res = measure_round_robin(targets, mnt, wl, a.runs)
            for kind, _image in targets:
                med, rss, n = res[kind]
                print(f"  {comp:12} {wl:8} {kind:10} {med:8.3f} s  ({n} {'paths' if wl == 'lstat' else 'bytes'})"
                      + (f"  peak RSS {rss:.0f} MB" if rss else ""), flush=True)
            rows.append((comp, wl, res))
    print()
    print(f"{'image':12} {'workload':8} {'kernel s':>9} {'ours s':>8} {'ours/k':>7} {'no-poll/k':>9} "
          f"{'squashfuse s':>13} {'sqfuse/k':>9} {'our RSS MB':>10}")
    for comp, wl, res in rows:
        k, o, s = res["kernel"][0], res["ours"][0], res["squashfuse"][0]
        nopoll = f"{k / res['ours-nopoll'][0]:9.2f}" if "ours-nopoll" in res else f"{'-':>9}"
        rss = res["ours"][1]
        print(f"{comp:12} {wl:8} {k:9.3f} {o:8.3f} {k / o:7.2f} {nopoll} {s:13.3f} {k / s:9.2f} "
              f"{(f'{rss:.0f}' if rss else '-'):>10}")
    print("(ratios: kernel time / time, medians of", a.runs, "cold-cache runs; higher is better, 1.0 = kernel;"
          " no-poll = our daemon with -o poll_us=0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
