"""A second process that decodes the big READs of a compressed file in parallel with the daemon.

A sequential read of a big lz4 file keeps the daemon busy: each 1 MiB READ costs ~1.2 ms of
Python and LZ4 (about 100 pclusters), and the reply's copy into the page cache comes on top.  The
GIL keeps a second thread from helping (measured: no gain), but a second process can: at mount,
before the FUSE session exists, the daemon forks a decoder that shares the open ``Image`` (and its
file descriptors, nothing else: every other descriptor is closed in the child, so it holds
neither /dev/fuse nor the mount's ready pipe).  decodeplan.py chooses which READs of a stream the
process decodes ahead, into slots of an anonymous shared mapping; the daemon answers those READs
from the slot (no copy: pyfuse3 replies from any buffer) and decodes the others itself as before.

Everything here runs on the trio thread and never waits long: results are collected with
non-blocking ``recv``; a READ whose result is being decoded right now waits for it at most
``WAIT`` seconds (a 1 MiB lz4 chunk takes ~1 ms), then the daemon decodes it itself.  If the
process dies or misbehaves, it is reaped, a warning is logged once, and the daemon goes on alone.
Local images use it, whatever their codec: lz4 is decoded inline on the daemon's side, lzma,
deflate and zstd in a worker thread (they release the GIL), while the process decodes ahead.  Before
it served lz4 only, a 121 MB file read at 0.44 (zstd), 0.63 (deflate) of the kernel's speed; with it
0.99 and 0.96 (bench_fuse "big").
"""

from __future__ import annotations

import ctypes   # imported here, not in the forked child
import logging
import mmap
import os
import select
import signal
import socket
import time

from .decodeplan import FULL_READ, DecodePlan
from .decodeproc import ANSWER, READY, REQUEST, serve

log = logging.getLogger(__name__)

SLOT_SIZE = FULL_READ    # a slot holds the largest READ
SLOTS = 8
MIN_READ = 256 * 1024   # smaller READs are cheaper to decode than to hand over
WAIT = 0.05             # seconds a READ waits for its result before the daemon decodes it itself
_REAP = 1.0             # seconds for the process to exit at close before it is killed


class Decoder:
    """The daemon's end: ``answer()`` a READ from the process, or None (decode it yourself)."""

    def __init__(self, image, keep_fds, *, slots: int = SLOTS, slot_size: int = SLOT_SIZE, **plan) -> None:
        self.slot_size = slot_size
        self.plan = DecodePlan(slots, full=slot_size, **plan)
        self._mem = mmap.mmap(-1, slots * slot_size)    # MAP_SHARED | MAP_ANONYMOUS: shared with the child
        self._view = memoryview(self._mem)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._poll = select.poll()
        self._poll.register(ours, select.POLLIN)
        self.ready = False
        self.waits = self.late = 0
        self.verified = None    # a verified image's verity.tree.TreeState (start())
        try:
            self.pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            self._view.release()
            self._mem.close()
            raise
        if self.pid == 0:   # pragma: no cover - the child; the tests see it through its answers
            code = 1
            try:
                _become_child(ours, theirs, keep_fds)
                serve(image, theirs, self._mem, slot_size)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        self._sock: socket.socket | None = ours

    @property
    def alive(self) -> bool:
        return self._sock is not None

    def answer(self, nid: int, off: int, size: int, file_size: int):
        """A READ of ``[off, off + size)`` of compressed inode ``nid``: the bytes as a buffer if the
        process decoded them, else None.  Either way, asks the process for what follows."""
        if self._sock is None or size > self.slot_size:
            return None
        plan = self.plan
        plan.release_lent()     # the previous answers are written to the kernel by now
        self._collect()
        if not self.ready:
            return None
        hit = plan.take(nid, off, size)
        if hit is None and plan.in_flight(nid, off, size) is not None:
            hit = self._wait_for(nid, off, size)
        if self._sock is not None:
            self._send(plan.plan(nid, off, size, file_size))
        if hit is None:
            return None
        slot, n = hit
        if self.verified is not None:   # the process checked every block of it
            dbs = self.verified.p.data_block_size
            self.verified.counts["blocks_verified"] += (off + n + dbs - 1) // dbs - off // dbs
        base = slot * self.slot_size
        return self._view[base:base + n]

    def close(self) -> None:
        """Stop the process (closing the socket ends it) and reap it."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._reap()
        self.plan.reset()
        try:
            self._view.release()
            self._mem.close()
        except BufferError:     # a slot still lent out: the mapping goes with its last view
            pass

    def summary(self) -> str:
        p = self.plan
        return (f"decoder process: {p.answered} READs answered of {p.submitted} decoded ahead "
                f"({self.waits} waited for, {self.late} too late, {p.dropped} unused)")

    # ---------------------------------------------------------------- internals
    def _collect(self) -> None:
        """Take in every answer that has arrived (non-blocking)."""
        sock = self._sock
        while sock is not None:
            try:
                msg = sock.recv(ANSWER.size)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(f"its socket failed ({exc.strerror})")
                return
            if len(msg) != ANSWER.size:
                self._fail("it closed its socket" if not msg else "it sent a torn message")
                return
            rid, n = ANSWER.unpack(msg)
            if rid == READY:
                self.ready = True
                continue
            try:
                self.plan.finished(rid, n if 0 <= n <= self.slot_size else None)
            except ValueError as exc:
                self._fail(str(exc))
                return

    def _wait_for(self, nid: int, off: int, size: int):
        """The result of this READ, in flight, if it comes within ``WAIT`` seconds, else None (dropped)."""
        self.waits += 1
        deadline = time.monotonic() + WAIT
        plan = self.plan
        while self._sock is not None and (rid := plan.in_flight(nid, off, size)) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.late += 1
                plan.abandon(rid)
                return None
            self._poll.poll(max(1, int(left * 1000)))
            self._collect()
        return plan.take(nid, off, size)

    def _send(self, jobs) -> None:
        for job in jobs:
            try:
                self._sock.send(REQUEST.pack(job.rid, job.nid, job.off, job.size, job.slot))
            except OSError as exc:
                self._fail(f"a request could not be sent ({exc.strerror})")
                return

    def _fail(self, why: str) -> None:
        log.warning("decoder process %s: %s; the daemon decodes everything itself from now on", self.pid, why)
        self.close()

    def _reap(self) -> None:
        if self.pid <= 0:
            return
        deadline = time.monotonic() + _REAP
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                break
            if time.monotonic() >= deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.005)
        self.pid = 0


def _become_child(ours: socket.socket, theirs: socket.socket, keep_fds) -> None:  # pragma: no cover
    """In the forked process: default signal handling, and no descriptor but the socket and the image's."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # no decoding for a daemon that is gone
    _prctl(_PR_SET_NAME, b"erofs-decoder")      # what ps and top show (the command line stays)
    logging.disable(logging.CRITICAL)   # a failed READ is redone, and reported, by the daemon
    signal.set_wakeup_fd(-1)    # trio's wake-up socket belongs to the daemon
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    ours.close()
    keep = sorted({fd for fd in keep_fds if fd > 2} | {theirs.fileno()})
    low = 3
    for fd in keep:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


_PR_SET_PDEATHSIG = 1     # include/uapi/linux/prctl.h
_PR_SET_NAME = 15


def _prctl(option: int, arg) -> None:  # pragma: no cover - the child
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):
        pass    # best effort: the socket's end of file ends the process as well


def why_not(sb, setting: int | None, cpus: int, *, verified: bool = False) -> str | None:
    """None if the image gets a decoder process under ``-o decoder=`` ``setting`` (None: not given)
    on a machine with ``cpus`` usable CPUs, else why not.  A *verified* image (dm-verity: every
    block hashed) gets one for its uncompressed data too."""
    if setting == 0:
        return "decoder=0"
    if setting is None:
        if not sb.marks_compression and not verified:
            return "no compressed data"
        if cpus < 2:
            return "one CPU"
    return None


def start(image, keep_fds, setting: int | None, *, verified=None, **kw) -> Decoder | None:
    """A running ``Decoder`` for a local ``image`` read through ``keep_fds``, or None (logged).
    *verified*: the image reads through a dm-verity check (verity/source.py) and this is its
    ``TreeState``; the process checks what it reads with its own copy of the tree (forked with the
    image), and the blocks of every READ it answers are counted here as verified."""
    from .busypoll import usable_cpus

    why = why_not(image.sb, setting, usable_cpus(), verified=verified is not None)
    if why is not None:
        (log.info if setting else log.debug)("no decoder process: %s", why)
        return None
    if not image.sb.lz4_only:
        # lzma, deflate, zstd take 2-10 ms per 1 MiB READ: the process keeps two rounds in front of
        # the reader (bench_fuse "big", 3 runs: lzma 0.87 -> 0.93, deflate 0.89 -> 0.96, zstd 1.04 ->
        # 0.99 of the kernel; an even split, every=2, was slower: 0.92, 0.79, 0.88)
        kw.setdefault("ahead", 2)
    try:
        dec = Decoder(image, keep_fds, **kw)
        dec.verified = verified
    except OSError as exc:
        log.warning("no decoder process (%s): the daemon decodes everything itself", exc.strerror or exc)
        return None
    log.info("decoder process %d %s big READs ahead", dec.pid,
             "reads and verifies" if verified is not None else "decodes compressed files")
    return dec
