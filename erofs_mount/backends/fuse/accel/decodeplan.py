"""Which READs of a sequential stream the decoder process takes: the bookkeeping, pure (no I/O).

The kernel reads a big file in READs of the read-ahead window's size, one after the other, once
the window has grown: a reader of 1 MiB at a time gets 1 MiB READs at multiples of 1 MiB, cat (128
KiB at a time) gets 256 KiB at 0, 512 KiB at 256 KiB, then 1 MiB READs at 768 KiB + k MiB.  Once
a stream is steady (a READ of the size of the one before, or a first READ of the full size), the
decoder process (decoder.py) decodes some of the next READs before they are asked for, in parallel
with the daemon, which decodes the others itself as before: of every ``every`` READs on the
stream's own grid (``off % size`` fixed) the daemon keeps one, the process gets the rest, up to
``ahead`` such rounds in front of the reader.  A daemon that answers a READ also
writes the reply (the kernel copies it into the page cache in the daemon's ``writev``), so it
keeps the smaller share; on the 2-CPU VM of bench_fuse.py the best split was 1 in 3.

A result is handed out only for exactly the READ it was made for (inode, offset and size), so an
answer from the process is byte for byte what ``Image.read`` gives the daemon.  Results nobody asks
for (the reader stopped, seeked, or read with other sizes) are dropped before any slot runs out:
first those behind their stream's position, then the oldest.  ``slots`` bounds the shared memory.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from dataclasses import dataclass

EVERY = 3           # the daemon decodes 1 READ in EVERY of a sequential stream itself
AHEAD = 1           # rounds of EVERY READs submitted in front of the reader
MAX_STREAMS = 64    # sequential streams remembered (inodes read in big READs)
FULL_READ = 1 << 20     # the largest READ the kernel sends (FUSE_MAX_MAX_PAGES 256 x 4 KiB)
PAGE = mmap.PAGESIZE    # the kernel's last READ of a file ends at EOF rounded up to a page


@dataclass
class Job:
    rid: int
    nid: int
    off: int
    size: int
    slot: int
    abandoned: bool = False     # the daemon stopped waiting for it: its result is dropped


class DecodePlan:
    def __init__(self, slots: int, *, every: int = EVERY, ahead: int = AHEAD, full: int = FULL_READ) -> None:
        if slots < 1 or every < 2 or ahead < 1:
            raise ValueError("DecodePlan needs slots >= 1, every >= 2, ahead >= 1")
        self.every, self.ahead, self.full = every, ahead, full
        self._free = list(range(slots - 1, -1, -1))
        self._lent: list[int] = []
        self._inflight: dict[int, Job] = {}                      # rid -> job
        self._wanted: dict[tuple[int, int, int], int] = {}      # (nid, off, size) -> rid, in flight
        self._done: OrderedDict[tuple[int, int, int], tuple[int, int]] = OrderedDict()  # -> (slot, n)
        self._next: OrderedDict[int, tuple[int, int]] = OrderedDict()  # nid -> (where it goes on, last size)
        self._rid = 0
        self.submitted = self.answered = self.dropped = 0

    # ---------------------------------------------------------------- results
    def take(self, nid: int, off: int, size: int) -> tuple[int, int] | None:
        """(slot, length) of the finished result for exactly this READ; the slot is lent to the reply."""
        hit = self._done.pop((nid, off, size), None)
        if hit is not None:
            self._lent.append(hit[0])
            self.answered += 1
        return hit

    def in_flight(self, nid: int, off: int, size: int) -> int | None:
        """The request id working on exactly this READ, if any."""
        return self._wanted.get((nid, off, size))

    def finished(self, rid: int, n: int | None) -> None:
        """The process answered ``rid``: ``n`` bytes in its slot, or None (it could not decode them)."""
        job = self._inflight.pop(rid, None)
        if job is None:
            raise ValueError(f"decoder answered unknown request {rid}")
        del self._wanted[(job.nid, job.off, job.size)]
        if n is None or job.abandoned:
            self._free.append(job.slot)
            self.dropped += 1
            return
        self._done[(job.nid, job.off, job.size)] = (job.slot, n)

    def abandon(self, rid: int) -> None:
        """The daemon stopped waiting for ``rid`` (it decodes that READ itself): drop its result."""
        job = self._inflight.get(rid)
        if job is not None:
            job.abandoned = True

    def release_lent(self) -> None:
        """The replies that carried lent slots are written: the slots are free again."""
        if self._lent:
            self._free.extend(self._lent)
            self._lent.clear()

    def reset(self) -> None:
        """The process is gone: nothing is in flight or finished any more."""
        slots = [j.slot for j in self._inflight.values()] + [s for s, _ in self._done.values()]
        self._free.extend(slots)
        self._inflight.clear()
        self._wanted.clear()
        self._done.clear()

    # ---------------------------------------------------------------- planning
    def plan(self, nid: int, off: int, size: int, file_size: int) -> list[Job]:
        """The requests to send now, after a READ of ``[off, off + size)`` of inode ``nid``."""
        at_, last = self._next.get(nid, (None, 0))
        self._next[nid] = (off + size, size)
        self._next.move_to_end(nid)
        while len(self._next) > MAX_STREAMS:
            self._next.popitem(last=False)
        # steady (module doc): the size of the READ before, or a first READ of the full size
        steady = (off == at_ and size == last) or (off == 0 and size >= self.full)
        if not steady or size <= 0:
            return []
        self._drop_behind(nid, off)
        jobs = []
        phase = off % size      # the stream's own grid
        c = off // size
        for cc in range(c + 1, c + 1 + self.every * self.ahead):
            at = cc * size + phase
            if at >= file_size:
                break
            if cc % self.every == 0:
                continue
            want = min(size, -(-(file_size - at) // PAGE) * PAGE)   # the last READ: whole pages to EOF
            key = (nid, at, want)
            if key in self._wanted or key in self._done:
                continue
            if not self._free and not self._drop_oldest():
                break
            self._rid += 1
            job = Job(self._rid, nid, at, want, self._free.pop())
            self._inflight[job.rid] = job
            self._wanted[key] = job.rid
            jobs.append(job)
        self.submitted += len(jobs)
        return jobs

    def _drop_behind(self, nid: int, off: int) -> None:
        stale = [k for k in self._done if k[0] == nid and k[1] < off]
        for k in stale:
            self._free.append(self._done.pop(k)[0])
        self.dropped += len(stale)

    def _drop_oldest(self) -> bool:
        if not self._done:
            return False
        self._free.append(self._done.popitem(last=False)[1][0])
        self.dropped += 1
        return True
