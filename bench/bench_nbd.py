"""NBD backend figures (not pass/fail).

1. Host: the trio server alone over a socketpair, a pipelined client in a child process,
   1 / 4 / 16 requests in flight, 128 KiB and 4 KiB reads, for each serving mode
   (sendfile, pread into a preallocated buffer, async read_at).
2. Inside user-mode Linux (same guest for both sides, so only ratios mean something):
   sequential read of a 100 MB file through erofs on our NBD device vs erofs on a loop
   device, 4 parallel readers, and the time from SIGKILL of the daemon to the first
   successful read after --reattach.

    python -m bench nbd            (or: python -m bench.bench_nbd [--host-only])
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1_000_000


# ------------------------------------------------------------------------------ host: server alone
def _client(sock: socket.socket, size: int, req: int, in_flight: int, seconds: float) -> tuple[int, int]:
    from erofs_mount.backends.nbd import proto

    buf = bytearray(16 + req)
    view = memoryview(buf)
    sent = done = 0
    nblocks = size // req
    rng = random.Random(1)
    deadline = time.monotonic() + seconds
    while sent < in_flight:
        sock.sendall(proto.pack_request(proto.NBD_CMD_READ, sent, rng.randrange(nblocks) * req, req))
        sent += 1
    while True:
        got = 0
        while got < 16 + req:
            n = sock.recv_into(view[got:], 16 + req - got)
            if not n:
                raise EOFError
            got += n
        done += 1
        if time.monotonic() >= deadline:
            break
        sock.sendall(proto.pack_request(proto.NBD_CMD_READ, sent, rng.randrange(nblocks) * req, req))
        sent += 1
    for _ in range(sent - done):  # drain
        got = 0
        while got < 16 + req:
            got += sock.recv_into(view[got:], 16 + req - got)
    sock.sendall(proto.pack_request(proto.NBD_CMD_DISC, 0))
    return done, done * req


def host_bench(seconds: float = 1.5) -> list[dict]:
    import trio

    from erofs_mount.sources.local import LocalSource
    from erofs_mount.backends.nbd.server import serve_nbd

    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "img"
        size = 64 << 20
        path.write_bytes(random.Random(0).randbytes(size))
        for mode in ("sendfile", "pread", "off"):
            for req in (128 * 1024, 4096):
                for depth in (1, 4, 16):
                    a, b = socket.socketpair()
                    rfd, wfd = os.pipe()
                    pid = os.fork()
                    if pid == 0:
                        a.close()
                        done, nbytes = _client(b, size, req, depth, seconds)
                        os.write(wfd, json.dumps([done, nbytes]).encode())
                        os._exit(0)
                    b.close()
                    os.close(wfd)
                    src = LocalSource.open(str(path))

                    async def run():
                        return await serve_nbd(trio.socket.from_stdlib_socket(a), src, zero_copy=mode)

                    t0 = time.monotonic()
                    trio.run(run)
                    elapsed = time.monotonic() - t0
                    os.waitpid(pid, 0)
                    done, nbytes = json.loads(os.read(rfd, 100))
                    os.close(rfd)
                    a.close()
                    trio.run(src.aclose)
                    rows.append({"mode": mode, "req": req, "depth": depth, "MB/s": nbytes / elapsed / MB,
                                 "req/s": done / elapsed})
    return rows


# ------------------------------------------------------------------------------ inside the guest
def _read_seq(path: str, chunk: int = 1 << 20) -> int:
    n = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            b = os.read(fd, chunk)
            if not b:
                return n
            n += len(b)
    finally:
        os.close(fd)


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def _timed_read(paths: list[str]) -> float:
    """MB/s for reading ``paths`` in parallel (one forked reader each), caches dropped first."""
    _drop_caches()
    t0 = time.monotonic()
    pids = []
    for p in paths:
        pid = os.fork()
        if pid == 0:
            _read_seq(p)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return sum(os.path.getsize(p) for p in paths) / (time.monotonic() - t0) / MB


def guest_bench(out: str, reps: int = 5) -> None:
    """All targets mounted at once and measured in turn (median of ``reps``), so drift in this
    shared machine's speed hits every target alike."""
    import statistics
    from dataclasses import replace

    from erofs_mount.backends.nbd import lifecycle, state, sysfs
    from erofs_mount.backends.nbd.config import NbdOptions

    work = Path(tempfile.mkdtemp(prefix="nbdbench", dir="/dev/shm"))
    tree = work / "tree"
    tree.mkdir()
    rng = random.Random(2)
    (tree / "big.bin").write_bytes(rng.randbytes(100 * MB))
    for i in range(4):
        (tree / f"part{i}.bin").write_bytes(rng.randbytes(25 * MB))
    img = work / "bench.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(img), str(tree)], check=True, timeout=300)
    for p in tree.iterdir():
        p.unlink()
    mounts: dict[str, Path] = {}
    ra = NbdOptions().read_ahead_kb
    for name, loop_ra in (("loop", None), ("loop-same-ra", ra)):  # two loop devices of the same image
        dev = subprocess.run(["losetup", "-r", "-f", "--show", str(img)], check=True, capture_output=True,
                             text=True, timeout=60).stdout.strip()
        if loop_ra:
            Path(f"/sys/block/{os.path.basename(dev)}/queue/read_ahead_kb").write_text(str(loop_ra))
        mounts[name] = work / name
        mounts[name].mkdir()
        subprocess.run(["mount", "-t", "erofs", "-o", "ro", dev, str(mounts[name])], check=True, timeout=60)
    base = NbdOptions(io_timeout=1, log_file=str(work / "daemon.log"))
    for mode in ("sendfile", "pread"):
        mounts[f"nbd-{mode}"] = work / f"nbd-{mode}"
        mounts[f"nbd-{mode}"].mkdir()
        lifecycle.mount(str(img), str(mounts[f"nbd-{mode}"]), replace(base, zero_copy=mode))
    samples: dict[str, dict[str, list[float]]] = {n: {"seq": [], "par4": []} for n in mounts}
    for _ in range(reps):
        for name, mnt in mounts.items():
            samples[name]["seq"].append(_timed_read([str(mnt / "big.bin")]))
            samples[name]["par4"].append(_timed_read([str(mnt / f"part{i}.bin") for i in range(4)]))
    results: dict = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in samples.items()}
    # reattach: SIGKILL → first successful uncached read (nothing in flight at the kill)
    mnt = mounts["nbd-sendfile"]
    idx = sysfs.index_of(sysfs.mount_at(str(mnt)).source)
    ident = sysfs.backend(idx)
    times = []
    for i in range(5):
        _drop_caches()
        pid = state.read_pid(state.pid_path(ident))
        t0 = time.monotonic()
        os.kill(pid, 9)
        while state.daemon_alive(state.pid_path(ident)):
            time.sleep(0.005)
        lifecycle.reattach(sysfs.device_path(idx), base)
        with open(mnt / "big.bin", "rb") as f:
            f.seek(i * 10 * MB)
            f.read(4096)
        times.append(time.monotonic() - t0)
    results["reattach_s"] = times
    for name, mnt in mounts.items():
        if name.startswith("nbd"):
            lifecycle.unmount(str(mnt))
        else:
            dev = sysfs.mount_at(str(mnt)).source
            subprocess.run(["umount", str(mnt)], check=True, timeout=60)
            subprocess.run(["losetup", "-d", dev], timeout=60)
    Path(out).write_text(json.dumps(results))


def uml_bench() -> dict | None:
    sys.path.insert(0, str(REPO))
    from tests.nbd.uml import boot, uml_available

    if uml_available():
        print(f"UML part skipped: {uml_available()}")
        return None
    rundir = Path(tempfile.mkdtemp(prefix="nbdbench-uml"))
    out = rundir / "results.json"
    script = f"cd {REPO}\nPYTHONDONTWRITEBYTECODE=1 {sys.executable} -m bench.bench_nbd --guest {out}\n"
    rc, log = boot(rundir, script, 400)
    if rc != 0 or not out.exists():
        print(f"UML bench failed (rc={rc}):\n{log[-3000:]}")
        return None
    return json.loads(out.read_text())


def main(argv: list[str]) -> None:
    if argv[:1] == ["--guest"]:
        guest_bench(argv[1])
        return
    if "--uml-only" not in argv:
        print("NBD server alone on the host, socketpair, random reads over a 64 MiB file:")
        print(f"{'mode':>9} {'req':>7} {'depth':>5} {'MB/s':>9} {'req/s':>9}")
        for r in host_bench():
            print(f"{r['mode']:>9} {r['req']:>7} {r['depth']:>5} {r['MB/s']:>9.1f} {r['req/s']:>9.0f}")
    if "--host-only" in argv:
        return
    res = uml_bench()
    if res:
        loop = res["loop"]
        print("\nInside UML (erofs; 100 MB file sequential; 4 parallel readers of 25 MB files), median MB/s:")
        for name, r in res.items():
            if name == "reattach_s":
                continue
            print(f"{name:>14}: seq {r['seq']:7.1f} ({r['seq'] / loop['seq']:.2f}x loop)   "
                  f"4 readers {r['par4']:7.1f} ({r['par4'] / loop['par4']:.2f}x loop)")
        print("reattach, SIGKILL to first successful read: " + ", ".join(f"{t:.2f}" for t in res["reattach_s"]) + " s")


if __name__ == "__main__":
    main(sys.argv[1:])
