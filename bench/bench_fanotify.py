"""fanotify mode vs FUSE mode vs download-then-loop-mount (issue 16): a ~500 MB registry image behind a
20 ms proxy; time to the first byte, cold read of every file, warm (all local) read of every file, bytes
fetched; the warm ratio to a loop mount of the complete file (goal >= 0.95).  Figures, not pass/fail.

bench_oci's image (uncompressed, ~500 MB, a 10 KB /etc/app/app.conf) in bench/work/oci/storage,
docker-registry over it, the fault proxy of tests/oci adding ``--delay`` to every request, then
alternating rounds, the page cache dropped before each measurement:

    fan-cold   `erofs-mount --mode fanotify -o oci.layer=0,oci.insecure,oci.cache=FRESH REF MNT`
    fan-warm   the same over the cache entry the cold pass completed (every byte local)
    fuse-cold  `--mode fuse` with a fresh oci.cache;  fuse-warm: over the entry fuse-cold filled
    loop-dl    GET the whole blob through the proxy, `mount -o loop,ro`, then the same reads
    loop       `mount -o loop,ro` of that complete file (the reference of the warm ratio)
    eu-*       erofs-utils' `mount.erofs -t erofs.fanotify` ($EROFS_UTILS_FANOTIFY_MOUNT, default
               /opt/erofs-utils-fan/sbin/mount.erofs; its sparse file is /var/cache/erofsmount/<hex>):
               eu-cold: from an empty sparse file (it fetches nothing before mount(2));
               eu-seeded (first round only, ~150 s): the bench wrote the metabuf ranges (erofs/metaranges.py,
               no directories) into the sparse file first, its daemon fetches the rest;  eu-warm: complete file

TTFB: from the mount command's start (the download's for loop-dl) to 1 byte of the small file; "read all":
every file, right after, on the same mount; "total": TTFB + read all; ratio: reference total / row total
(cold rows: loop-dl, warm rows: loop).  Fetched: the daemon's source statistics (network bytes); eu-*: what
the sparse file gained (its daemon publishes nothing).  Reads run in a child process with a timeout (a
pre-content event nobody answers would block a reader forever).

    python -m bench fanotify      (or: python -m bench.bench_fanotify [--rounds 3] [--delay 0.02])
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
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

from bench.bench_e2e import SMALL, _drop_caches, _first_byte  # noqa: E402
from bench.bench_fuse import w_readall  # noqa: E402
from bench.bench_fuse_oci import _daemons, _published  # noqa: E402
from erofs_mount.backends.fanotify import record  # noqa: E402

MiB = 1 << 20
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CLI = [sys.executable, "-m", "erofs_mount"]
EU_CACHE = Path("/var/cache/erofsmount")   # erofs-utils mount/main.c EROFSMOUNT_CACHE_DIR
EU_STATE = Path("/var/run/erofsmount/fanotify")
EU_BIN = os.environ.get("EROFS_UTILS_FANOTIFY_MOUNT", "/opt/erofs-utils-fan/sbin/mount.erofs")
READ_TIMEOUT = 600.0
ROWS = ["fan-cold", "fan-warm", "fuse-cold", "fuse-warm", "loop-dl", "loop", "eu-cold", "eu-seeded", "eu-warm"]


# ------------------------------------------------------------------------------- child processes
def _walk_child(mnt: str) -> int:
    """``--walk MNT``: say ready, wait for "go", read 1 byte of SMALL, then every file; print the times."""
    print("ready", flush=True)
    sys.stdin.readline()
    got = len(_first_byte(Path(mnt) / SMALL))
    t1 = time.perf_counter()                 # CLOCK_MONOTONIC: comparable with the parent's clock
    n = w_readall(mnt)
    print(json.dumps({"first": t1, "done": time.perf_counter(), "bytes": n, "got": got}), flush=True)
    return 0


def _proxy_child(port: int, delay: float) -> int:
    """``--proxy PORT DELAY``: tests/oci/_faultproxy.py's proxy in this process; its port on stdout."""
    from tests.oci._faultproxy import main as proxy_main

    proxy_main([str(port), str(delay)])
    return 0


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise TimeoutError(f"no answer from {' '.join(map(str, proc.args[-3:]))} in {timeout:.0f} s")
    return proc.stdout.readline().strip()


# ------------------------------------------------------------------------------ mounts, measuring
def _measure(mnt: Path, mount) -> dict:
    """Drop caches, run ``mount()`` (raises on failure), then 1 byte and every file in a child process."""
    walker = subprocess.Popen([sys.executable, "-m", "bench.bench_fanotify", "--walk", str(mnt)], cwd=REPO,
                              env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        _readline(walker, 60)
        _drop_caches()
        t0 = time.perf_counter()
        mount()
        t_mount = time.perf_counter() - t0
        walker.stdin.write("go\n")
        walker.stdin.flush()
        res = json.loads(_readline(walker, READ_TIMEOUT) or "{}")
        if not res.get("got"):
            raise RuntimeError(f"reads failed on {mnt}")
        return {"mount": t_mount, "ttfb": res["first"] - t0, "read": res["done"] - res["first"],
                "total": res["done"] - t0, "t_done": time.time()}
    finally:
        if walker.poll() is None:
            walker.kill()                   # a reader waiting for a pre-content answer is killable
        walker.wait(30)


def _run(cmd: list[str], timeout: float = 300) -> None:
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-4:])}: rc={res.returncode}: {(res.stderr or res.stdout).strip()[-400:]}")


def _mounted(mnt: Path) -> str | None:
    """The filesystem type mounted at ``mnt``, or None."""
    with open("/proc/self/mountinfo") as f:
        return next((line.split(" - ")[1].split()[0] for line in f if line.split()[4] == str(mnt)), None)


def _unmount(mnt: Path) -> None:
    """Whoever mounted ``mnt`` (our CLI, erofs-utils, a loop mount), with bounded waits; then the processes
    that served it must be gone (killed by pid after 15 s)."""
    doc, eu = record.read(str(mnt)), _eu_worker(mnt)
    pids = [*(doc or {}).get("pids", {}).values(), *_daemons(mnt), eu]
    for _ in range(20):
        fstype = _mounted(mnt)
        if fstype is None:
            break
        cmd = (CLI + ["-u", str(mnt)] if doc is not None or fstype.startswith("fuse")
               else [EU_BIN, "-u", str(mnt)] if eu else ["umount", "-d", str(mnt)])
        subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, timeout=120)
        if _mounted(mnt):
            time.sleep(0.25)
    else:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)
    if record.read(str(mnt)) is not None:            # no mount (any more), yet a record: stop its processes
        subprocess.run(CLI + ["-u", str(mnt)], cwd=REPO, env=ENV, capture_output=True, timeout=120)
    deadline = time.monotonic() + 15
    while any(record.alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in pids:                          # started by this round: daemon, holder, guard, worker
        if record.alive(p):
            print(f"  (pid {p} still alive after unmounting {mnt}: killed)")
            os.kill(p, 9)


def _our_round(mode: str, ref: str, mnt: Path, cache: Path, pids: set) -> dict:
    cmd = CLI + ["--mode", mode, "-o", f"oci.layer=0,oci.insecure,oci.cache={cache}", ref, str(mnt)]
    try:
        row = _measure(mnt, lambda: _run(cmd))
        if mode == "fuse":
            st = _published(mnt, row["t_done"])
            return {**row, "fetched": (st.get("bytes_fetched") or 0) + (st.get("bytes_discarded") or 0)}
        doc = None
        for _ in range(100):                # the daemon publishes every 2 s: a fresh record, bounded wait
            doc = record.read(str(mnt))
            if doc and doc.get("updated", 0) > row["t_done"]:
                break
            time.sleep(0.05)
        pids.update((doc or {}).get("pids", {}).values())
        st = (doc or {}).get("stats", {})
        src = st.get("source", {})
        return {**row, "fetched": src.get("bytes_fetched", 0) + src.get("bytes_discarded", 0), "stats": st}
    finally:
        _unmount(mnt)


def _loop_round(url: str, size: int, mnt: Path, blob: Path) -> dict:
    import httpx

    def loop_mount() -> None:
        _run(["mount", "-t", "erofs", "-o", "ro,loop", str(blob), str(mnt)], 120)

    def download_and_mount() -> None:
        got = 0
        with httpx.Client(timeout=60) as c, c.stream("GET", url, follow_redirects=True) as r, open(blob, "wb") as f:
            r.raise_for_status()
            for piece in r.iter_bytes(4 * MiB):
                got += f.write(piece)
        if got != size:
            raise RuntimeError(f"download: {got} of {size} bytes")
        loop_mount()
    try:
        try:
            row = {**_measure(mnt, download_and_mount), "fetched": size}
        finally:
            _unmount(mnt)
        try:
            return {"loop-dl": row, "loop": {**_measure(mnt, loop_mount), "fetched": 0}}
        finally:
            _unmount(mnt)
    finally:
        blob.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ erofs-utils
def _eu_worker(mnt: Path) -> int | None:
    """The fanotify worker erofs-utils runs for ``mnt`` (its state file: pid, mount point, sparse file)."""
    states = (f.read_text(errors="replace").splitlines() + ["", ""] for f in EU_STATE.glob("*.state"))
    return next((int(x[0]) for x in states if x[1] == str(mnt) and x[0].isdigit()), None)


def _eu_probe() -> str | None:
    """Why erofs-utils' fanotify mode cannot be tried at all, or None (no network: no DEVICE given)."""
    if not os.access(EU_BIN, os.X_OK):
        return f"{EU_BIN}: not found (build erofs-utils >= 1.9 with --enable-fanotify)"
    res = subprocess.run([EU_BIN, "-t", "erofs.fanotify"], capture_output=True, text=True, timeout=30)
    return f"{EU_BIN}: {res.stderr.strip().splitlines()[0]}" if "not built-in" in res.stderr else None


def _kmsg_erofs(after: float = -1.0) -> list[tuple[float, str]]:
    """The kernel's erofs lines (timestamp, text) later than ``after``."""
    out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    lines = [(float(m[1]), m[2]) for m in (re.match(r"\[\s*([\d.]+)\] (.*)", x) for x in out) if m]
    return [(t, x) for t, x in lines if t > after and "erofs" in x]


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512 if path.exists() else 0


def _eu_round(kind: str, ref: str, mnt: Path, image: Path, sparse: Path, pids: set) -> dict:
    EU_CACHE.mkdir(mode=0o700, exist_ok=True)
    sparse.unlink(missing_ok=True)
    if kind == "eu-warm":
        shutil.copyfile(image, sparse)
    elif kind == "eu-seeded":
        from erofs_mount.erofs.image import Image
        from erofs_mount.erofs.metaranges import metadata_ranges

        with open(image, "rb") as src, open(sparse, "wb") as dst:
            dst.truncate(image.stat().st_size)
            img = Image(lambda off, n: os.pread(src.fileno(), n, off), size=image.stat().st_size)
            for off, n in metadata_ranges(img, include_dirs=False, align=4096):
                os.pwrite(dst.fileno(), os.pread(src.fileno(), n, off), off)
            os.fsync(dst.fileno())
    before, kmsg = _allocated(sparse), max([t for t, _ in _kmsg_erofs()], default=-1.0)

    def mount() -> None:
        # stderr to a file: the worker it forks keeps a pipe open, waiting for EOF would never end
        with tempfile.TemporaryFile("w+") as err:
            rc = subprocess.run([EU_BIN, "-t", "erofs.fanotify", "-o", "oci.layer=0,oci.insecure", ref, str(mnt)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=120).returncode
            err.seek(0)
            msg = [x for x in err.read().strip().splitlines() if not x.startswith("<W>")]
        if _eu_worker(mnt):
            pids.add(_eu_worker(mnt))
        if rc != 0:
            raise RuntimeError(f"mount.erofs rc={rc}: {' / '.join(msg)}; kernel: "
                               f"{' / '.join(x for _, x in _kmsg_erofs(kmsg)) or '-'}; "
                               f"sparse file: {_allocated(sparse)} bytes allocated")
    try:
        return {**_measure(mnt, mount), "fetched": _allocated(sparse) - before}
    finally:
        _unmount(mnt)


# ------------------------------------------------------------------------------------------- report
def _report(results: dict, errors: dict, args) -> None:
    med = {k: {f: statistics.median(r[f] for r in rows) for f in ("mount", "ttfb", "read", "total", "fetched")}
           for k, rows in results.items() if rows}
    print(f"{'row':>10} {'mount s':>8} {'TTFB s':>8} {'read all s':>11} {'total s':>8} {'fetched MiB':>12} "
          f"{'ratio to loop':>14}   rounds: total s/fetched MiB")
    for name in (n for n in ROWS if n in med):
        m = med[name]
        ref = med.get("loop" if name.endswith("warm") or name == "loop" else "loop-dl")
        ratio = f"{ref['total'] / m['total']:.2f}" if ref else "-"
        print(f"{name:>10} {m['mount']:8.2f} {m['ttfb']:8.2f} {m['read']:11.2f} {m['total']:8.2f} "
              f"{m['fetched'] / MiB:12.1f} {ratio:>14}   "
              + " ".join(f"{r['total']:.2f}/{r['fetched'] / MiB:.0f}" for r in results[name]))
    for name, msgs in errors.items():
        for msg in dict.fromkeys(msgs):
            print(f"{name:>10}: failed {msgs.count(msg)}/{len(msgs) + len(results[name])}: {msg}")
    print("ratio: loop-dl total / row total (cold rows, eu-seeded), loop total / row total (warm rows)")
    if "fan-warm" in med and "loop" in med:
        w, lp = med["fan-warm"], med["loop"]
        print(f"warm ratio, loop mount of the complete file / fanotify warm: {lp['total'] / w['total']:.2f}x "
              f"(mount + read every file; goal >= 0.95x); read every file alone: {lp['read'] / w['read']:.2f}x")
    for r in results["fan-cold"][-1:]:
        st, src = r["stats"], r["stats"].get("source", {})
        print(f"fan-cold daemon (last round): {st.get('requests')} fills from the holder, {src.get('requests')} "
              f"range requests in {src.get('streams')} streams; written to the cache file: source "
              f"{src.get('disk_bytes_written', 0) / MiB:.0f} MiB + filler {st.get('bytes_written', 0) / MiB:.0f} MiB; "
              f"bytes_local published {st.get('bytes_local', 0) / MiB:.0f} of {st.get('size', 0) / MiB:.0f} MiB")


def _log_summary(path: str, offset: int, pids: set) -> None:
    """WARNING/ERROR lines this run's fanotify processes wrote (the log is shared with other mounts)."""
    kinds: dict[str, int] = {}
    with open(path if os.path.exists(path) else os.devnull, errors="replace") as f:
        f.seek(offset)
        for m in (re.search(r"\[(\d+)\] ((?:WARNING|ERROR) .*)", x) for x in f):
            if m and int(m[1]) in pids:
                key = re.sub(r"\d+", "N", m[2])[:160]
                kinds[key] = kinds.get(key, 0) + 1
    print(f"{path}: {sum(kinds.values())} WARNING/ERROR line(s) from this run's daemons, holders, guards"
          + "".join(f"\n    {n} x {k}" for k, n in kinds.items()))


def _leftovers(tmp: Path, mnt: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if str(tmp) in line or str(EU_CACHE) in line]
    procs = _daemons(mnt)                   # every process this bench started names the mount point
    print(f"cleanup: {len(mounts)} mount(s) {mounts or ''} and {len(procs)} process(es) {procs or ''} left")


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_fanotify")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.020, help="seconds the proxy adds to every request")
    ap.add_argument("--image-mb", type=int, default=500)
    ap.add_argument("--walk", help=argparse.SUPPRESS)
    ap.add_argument("--proxy", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.walk or args.proxy:             # the child processes
        return _walk_child(args.walk) if args.walk else _proxy_child(int(args.proxy[0]), float(args.proxy[1]))

    from bench.bench_oci import build_image, push_image
    from erofs_mount.backends.fanotify.kernel import unsupported_reason
    from erofs_mount.daemon import log_path
    from erofs_mount.sources.diskcache import DiskCache
    from tests.oci._servers import REGISTRY_BIN, start_registry

    work = HERE / "work" / "oci"
    work.mkdir(parents=True, exist_ok=True)
    why = unsupported_reason(str(work))
    if why or REGISTRY_BIN is None or shutil.which("mkfs.erofs") is None or not os.path.exists("/dev/fuse"):
        print(f"bench_fanotify skipped: {why or 'needs docker-registry, mkfs.erofs and /dev/fuse'}")
        return 0
    t_start = time.perf_counter()
    image = build_image(work, args.image_mb)
    size = image.stat().st_size
    eu_why = _eu_probe()
    eu_dirs = [d for d in (EU_STATE, EU_STATE.parent, EU_CACHE) if not d.exists()]   # removed again if empty
    log = log_path("fanotify")
    log_at = os.path.getsize(log) if os.path.exists(log) else 0
    tmp = Path(tempfile.mkdtemp(prefix="fanotify-", dir=work))
    mnt, pids = tmp / "mnt", set()
    mnt.mkdir()
    results: dict[str, list] = {k: [] for k in ROWS}
    errors: dict[str, list] = {}
    reg = start_registry(tmp / "registry", work / "storage")
    proxy = sparse = None
    try:
        digest = push_image(reg.url, image)
        sparse = EU_CACHE / digest.removeprefix("sha256:")
        proxy = subprocess.Popen(["setpriv", "--pdeathsig", "TERM", sys.executable, "-m", "bench.bench_fanotify",
                                  "--proxy", str(reg.port), str(args.delay)], cwd=REPO, env=ENV,
                                 stdout=subprocess.PIPE, text=True)
        host = f"127.0.0.1:{int(_readline(proxy, 30))}"
        ref = f"{host}/bench/app:v1"
        fan_cache, fuse_cache = tmp / "cache-fanotify", tmp / "cache-fuse"
        for rnd in range(args.rounds):
            shutil.rmtree(fan_cache, ignore_errors=True)
            shutil.rmtree(fuse_cache, ignore_errors=True)
            steps = [("fan-cold", lambda: _our_round("fanotify", ref, mnt, fan_cache, pids)),
                     ("fan-warm", lambda: _our_round("fanotify", ref, mnt, fan_cache, pids)),
                     ("fuse-cold", lambda: _our_round("fuse", ref, mnt, fuse_cache, pids)),
                     ("fuse-warm", lambda: _our_round("fuse", ref, mnt, fuse_cache, pids)),
                     ("loop", lambda: _loop_round(f"http://{host}/v2/bench/app/blobs/{digest}", size, mnt,
                                                  tmp / "blob.erofs"))]
            if eu_why is None:
                steps += [(k, lambda k=k: _eu_round(k, ref, mnt, image, sparse, pids))
                          for k in ("eu-cold", "eu-seeded", "eu-warm") if k != "eu-seeded" or rnd == 0]
            cold_ok = False
            for name, step in steps:
                if name == "fan-warm" and not cold_ok:
                    continue                # no complete entry to be warm over
                try:
                    row = step()
                except Exception as exc:  # noqa: BLE001 - a failed row is reported, the others go on
                    errors.setdefault(name, []).append(re.sub(r"127\.0\.0\.1:\d+", "HOST", str(exc)))
                    continue
                cold_ok = cold_ok or name == "fan-cold"
                for k, r in (row.items() if name == "loop" else [(name, row)]):
                    results[k].append(r)
                if name == "fan-cold":          # fan-warm must find every byte local
                    (entry := DiskCache.open(str(fan_cache), digest, size)).close()
                    if not entry.complete:
                        print(f"  round {rnd + 1}: fan-warm is not all local: {entry.present_bytes} of {size} bytes")
            print(f"  round {rnd + 1}/{args.rounds} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    finally:
        _unmount(mnt)
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=10)
        reg.stop()
        if sparse is not None:
            sparse.unlink(missing_ok=True)
        for d in eu_dirs:
            with contextlib.suppress(OSError):
                d.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"image {size / MiB:.0f} MiB, proxy +{args.delay * 1000:.0f} ms per request, {args.rounds} alternating "
          f"rounds (medians), page cache dropped before each measurement; {time.perf_counter() - t_start:.0f} s")
    _report(results, errors, args)
    if eu_why:
        print(f"   eu-*: not timed: {eu_why}")
    _log_summary(log, log_at, pids)
    _leftovers(tmp, mnt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
