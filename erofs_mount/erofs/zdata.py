"""The compressed read path (kernel ``fs/erofs/zdata.c``, much simplified) with a bounded LRU of
decoded pclusters.

``ZReader(image)`` is created once per image by ``Image`` (lazily) and serves
``Image.read`` for ``COMPRESSED_FULL``/``COMPRESSED_COMPACT`` inodes:

    inode -> ZMap (zmap.py: header + indexes)  -> whole extents
    extent -> raw pcluster (primary device, or metadata space for inline tails)
           -> decompress.py -> cached decoded bytes -> the requested slice

A read maps its whole range first (one lock hold), looks the decoded pclusters up once,
reads the raw bytes of adjacent uncached pclusters with one device read, then decodes in
logical order, so errors surface in the order a one-extent-at-a-time reader meets them.
The LRU keeps the pclusters a request reads only in part (the edges a sequential reader
returns to); one a request consumes whole is decoded and dropped.

Fragments are read from the packed inode (``sb.packed_nid``) through ``Image.read``,
hence through this same machinery (and its cache) when the packed inode is compressed.
Every failure is a ``CorruptedError`` (EUCLEAN) or ``SourceError`` (EIO) naming the inode and
the logical offset; nothing else escapes a read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

from ..errors import CorruptedError, ErofsMountError, ShortReadError
from ..nowait import hold
from . import decompress as D
from .compr_cfgs import ComprCfgs, parse_compr_cfgs
from .zmap import ZEXT_FRAGMENT, ZEXT_HOLE, ZEXT_MAPPED, ZEXT_META, ZExtent, ZMap

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
_INCOMPAT_BIG_PCLUSTER = 0x2
_MAX_NESTING = 4        # packed inode / metabox reads inside a read
_PREFETCH_BYTES = 4 << 20   # raw bytes of adjacent pclusters fetched with one read
_PREFETCH_MAX_PCLUSTER = 16 << 10   # bigger pclusters: copying them out of a run costs more than a read
_INTERLACED = D.Z_EROFS_COMPRESSION_INTERLACED
_LZ4 = D.Z_EROFS_COMPRESSION_LZ4
_MAX_DSIZE = D.Z_EROFS_PCLUSTER_MAX_DSIZE


class ZReader:
    def __init__(self, image, cache_bytes: int = DEFAULT_CACHE_BYTES, max_inodes: int = 1024) -> None:
        self.img = image
        sb = image.sb
        self.block_size = 1 << sb.blkszbits
        self.cfgs: ComprCfgs = parse_compr_cfgs(sb.feature_incompat, sb.available_compr_algs, sb.sb_size,
                                                sb.blkszbits, image.read_raw)
        self._big_pcluster = bool(sb.feature_incompat & _INCOMPAT_BIG_PCLUSTER)
        self._lock = threading.RLock()         # inode maps (re-entered by metabox / packed-inode reads)
        self._cache_lock = threading.Lock()     # the decoded-pcluster LRU and the statistics
        self._multi_device = bool(getattr(sb, "devices", ()))
        self._maps: OrderedDict[int, tuple[ZMap, list[ZExtent]]] = OrderedDict()
        self._max_inodes = max_inodes
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self.cache_limit = cache_bytes
        self._cache_bytes = 0
        self._tls = threading.local()
        self._hits = self._misses = self._evictions = self._errors = 0
        self._bytes_decompressed = self._bytes_read = 0

    # ------------------------------------------------------------------ public API
    def read(self, inode, offset: int, length: int, sink=None):
        """Exactly ``length`` bytes from ``offset`` of a compressed inode (short only at EOF); with a
        writable buffer ``sink``, they are written there instead and their count is returned."""
        end = min(offset + max(length, 0), inode.size)
        if offset < 0 or offset >= end:
            return b"" if sink is None else 0
        depth = getattr(self._tls, "depth", 0)
        if depth >= _MAX_NESTING:
            raise CorruptedError(f"inode {inode.nid}: packed inode / metabox reads nest too deep")
        self._tls.depth = depth + 1
        try:
            return self._read(inode, offset, end, sink)
        except ErofsMountError:
            with self._cache_lock:
                self._errors += 1
            raise
        finally:
            self._tls.depth = depth

    def stats(self) -> dict:
        with self._cache_lock:
            lookups = self._hits + self._misses
            return {
                "hits": self._hits, "misses": self._misses,
                "hit_ratio": self._hits / lookups if lookups else 0.0,
                "bytes_decompressed": self._bytes_decompressed, "bytes_read": self._bytes_read,
                "cache_bytes": self._cache_bytes, "cache_entries": len(self._cache),
                "cache_limit": self.cache_limit, "evictions": self._evictions, "errors": self._errors,
                "algorithms": self.cfgs.names(),
            }

    def extents(self, inode) -> Iterator[ZExtent]:
        """Every extent of a compressed inode, in order (for inspection tools and tests)."""
        pos = 0
        while pos < inode.size:
            ext = self._extent(inode, pos)
            if not ext.la <= pos < ext.la + ext.llen:
                raise CorruptedError(f"inode {inode.nid}: empty extent at logical offset {pos}")
            yield ext
            pos = ext.la + ext.llen

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()
            self._cache_bytes = 0

    # ------------------------------------------------------------------ mapping
    def _zmap(self, inode) -> tuple[ZMap, list[ZExtent]]:
        hit = self._maps.get(inode.nid)
        if hit is not None:
            self._maps.move_to_end(inode.nid)
            return hit
        img = self.img
        in_mbox = inode.in_metabox
        zm = ZMap(inode, self.img.sb.blkszbits, self.cfgs.available_compr_algs, self._big_pcluster,
                  lambda pos, n: img.read_meta(pos, n, in_mbox))
        hit = self._maps[inode.nid] = (zm, [])
        while len(self._maps) > self._max_inodes:
            self._maps.popitem(last=False)
        return hit

    def _extent(self, inode, pos: int) -> ZExtent:
        exts, err = self._map_range(inode, pos, pos + 1)
        if err is not None:
            raise err
        return exts[0]

    def _map_range(self, inode, pos: int, end: int) -> tuple[list[ZExtent], ErofsMountError | None]:
        """The extents covering ``[pos, end)`` in order, mapped under one lock hold.

        A mapping failure after the first extent is returned beside the extents before it,
        so the caller meets the errors in logical order, as one extent at a time would.
        """
        exts: list[ZExtent] = []
        # mapping may read metadata; a worker thread holding the lock meanwhile may be waiting for
        # the trio loop (a registry read), so the trio thread's inline attempt must not wait for it
        with hold(self._lock):
            zm, recent = self._zmap(inode)
            known = 0
            try:
                while pos < end:
                    for ext in recent:      # e.g. the extent a sequential reader left off in
                        if ext.la <= pos < ext.la + ext.llen:
                            exts.append(ext)
                            pos = ext.la + ext.llen
                            known += 1
                            break
                    else:
                        zm.map_run(pos, end, exts)
                        break
            except ErofsMountError as exc:
                if not exts:
                    raise
                return exts, exc
            finally:
                if len(exts) > known:   # the last few newly mapped extents, newest first
                    new = exts[max(known, len(exts) - 4):]
                    new.reverse()
                    recent[:0] = new
                    del recent[4:]
        return exts, None

    # ------------------------------------------------------------------ reading
    def _read(self, inode, pos: int, end: int, sink=None):
        start = pos
        exts, err = self._map_range(inode, pos, end)
        bs = self.block_size
        mbox = inode.in_metabox
        if len(exts) == 1 and err is None:     # fast path: inside one extent whose pcluster we hold
            la, llen, kind, pa, plen, alg, _, _ = exts[0]
            if kind == ZEXT_MAPPED or kind == ZEXT_META:
                data = self._cached((kind, kind == ZEXT_META and mbox, pa, plen, alg, llen,
                                     la % bs if alg == _INTERLACED else 0))
                if data is not None:
                    data = data[pos - la:end - la]
                    if len(data) == end - pos:
                        if sink is not None:
                            sink[:len(data)] = data
                            return len(data)
                        return data
                    raise CorruptedError(f"inode {inode.nid}: got {len(data)} of {end - pos} bytes "
                                         f"at logical offset {pos}")
        # one cache pass for the whole request: the decoded pclusters we hold, the keys of the rest
        found: list = [None] * len(exts)
        wanted: list[int] = []
        with self._cache_lock:
            cache = self._cache
            for i, (la, llen, kind, pa, plen, alg, _, _) in enumerate(exts):
                if kind == ZEXT_MAPPED or kind == ZEXT_META:
                    key = (kind, kind == ZEXT_META and mbox, pa, plen, alg, llen, la % bs if alg == _INTERLACED else 0)
                    data = cache.get(key)
                    if data is not None:
                        cache.move_to_end(key)
                        self._hits += 1
                        found[i] = data
                    else:
                        found[i] = key
                        wanted.append(i)
        raws = self._prefetch(exts, wanted) if len(wanted) > 1 and not self._multi_device else None
        out = []
        mine: dict[tuple, bytes] = {}       # decoded in this request
        keep: list[tuple[tuple, bytes]] = []
        done = [0, 0, 0]                    # decodes, raw bytes, decoded bytes (accounted at the end)
        try:
            for i, ext in enumerate(exts):
                la, llen, kind = ext[0], ext[1], ext[2]
                stop = min(la + llen, end)
                skip, n = pos - la, stop - pos
                if kind == ZEXT_HOLE:
                    data = bytes(n)
                elif kind == ZEXT_FRAGMENT:
                    data = self._fragment(inode, ext.fragmentoff + skip, n, pos)
                else:
                    data = found[i]
                    if type(data) is tuple:     # not cached when we looked
                        key = data
                        data = mine.get(key)
                        if data is None:
                            # The LRU keeps only pclusters this request reads in part: a
                            # sequential reader comes back for those (the request's edges),
                            # never for one consumed whole, which would only push the edges
                            # out (and cost memory bandwidth).
                            partial = skip or stop != la + llen
                            if partial:     # another thread may have decoded it meanwhile
                                data = self._cached(key)
                            if data is None:
                                data = self._decode(inode, ext, raws[i] if raws else None, done)
                                if partial:
                                    keep.append((key, data))
                            mine[key] = data
                    if skip or n != len(data):
                        data = data[skip:stop - la]
                if len(data) != n:
                    raise CorruptedError(f"inode {inode.nid}: got {len(data)} of {n} bytes at logical offset {pos}")
                if sink is None:
                    out.append(data)
                else:
                    sink[pos - start:stop - start] = data
                pos = stop
        finally:
            if done[0] or keep:
                self._account(done, keep)
        if err is not None:
            raise err
        if sink is not None:
            return pos - start
        return out[0] if len(out) == 1 else b"".join(out)

    def _cached(self, key: tuple) -> bytes | None:
        with self._cache_lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                self._hits += 1
            return data

    def _account(self, done: list[int], keep: list[tuple[tuple, bytes]]) -> None:
        """Statistics of one request's decodes, and the decoded pclusters it keeps."""
        with self._cache_lock:
            self._misses += done[0]
            self._bytes_read += done[1]
            self._bytes_decompressed += done[2]
            cache = self._cache
            for key, data in keep:
                if len(data) <= self.cache_limit and key not in cache:
                    cache[key] = data
                    self._cache_bytes += len(data)
            while self._cache_bytes > self.cache_limit:
                _, old = cache.popitem(last=False)
                self._cache_bytes -= len(old)
                self._evictions += 1

    def _prefetch(self, exts: list[ZExtent], wanted: list[int]) -> list[bytes | None] | None:
        """Raw bytes of small uncached pclusters that lie back to back on the primary device, each
        run read with one ``read_mapped`` call: ``raws[i]`` for ``exts[i]`` (``None``: not read).

        Only on single-device images (a run could cross a device's unified address range).
        A short run read is dropped: the pclusters are then read one by one and the first
        unreadable one is reported as before.
        """
        cand = [i for i in wanted if exts[i][2] == ZEXT_MAPPED and exts[i][4] <= _PREFETCH_MAX_PCLUSTER]
        raws: list[bytes | None] | None = None
        k, nc = 0, len(cand)
        while k < nc:
            _, _, _, first, total, _, _, _ = exts[cand[k]]
            nxt = first + total
            j = k + 1
            while j < nc:
                _, _, _, pa, plen, _, _, _ = exts[cand[j]]
                if pa != nxt or total + plen > _PREFETCH_BYTES:
                    break
                total += plen
                nxt += plen
                j += 1
            if j - k > 1:
                try:
                    raw = self._read_pcluster(first, total)
                except ErofsMountError:
                    raw = b""
                if len(raw) == total:
                    if raws is None:
                        raws = [None] * len(exts)
                    for i in cand[k:j]:
                        _, _, _, pa, plen, _, _, _ = exts[i]
                        raws[i] = raw[pa - first:pa - first + plen]
            k = j
        return raws

    def _fragment(self, inode, off: int, n: int, la: int) -> bytes:
        packed = self.img.sb.packed_nid
        if not packed or inode.nid == packed:
            raise CorruptedError(f"inode {inode.nid}: fragment at logical offset {la} but no packed inode")
        data = self.img.read(packed, off, n)
        if len(data) != n:
            raise CorruptedError(f"inode {inode.nid}: fragment at logical offset {la} lies past the end of "
                                 f"the packed inode (offset {off} + {n})")
        return data

    def _decode(self, inode, ext: ZExtent, raw: bytes | None, done: list[int]) -> bytes:
        """The decoded pcluster of ``ext`` (``raw``: its bytes if already read); counts into ``done``."""
        if raw is None:
            if ext.kind == ZEXT_META:
                raw = self.img.read_meta(ext.pa, ext.plen, inode.in_metabox)
            elif ext.kind == ZEXT_MAPPED:
                raw = self._read_pcluster(ext.pa, ext.plen)
            else:  # pragma: no cover - holes and fragments are handled by the caller
                raise CorruptedError(self._where(inode, ext) + ": not a pcluster")
            if len(raw) != ext.plen:
                raise ShortReadError(f"{self._where(inode, ext)}: only {len(raw)} bytes readable")
        done[0] += 1
        done[1] += len(raw)
        cfgs = self.cfgs
        try:
            if ext.alg == _LZ4 and 0 < ext.llen <= _MAX_DSIZE:    # the common case, without the dispatch
                data = D.decompress_lz4(raw, ext.llen, not ext.partial, cfgs.zero_padding)
            else:
                data = D.decompress(ext.alg, raw, ext.llen, strict=not ext.partial, zero_padding=cfgs.zero_padding,
                                    la=ext.la, block_size=self.block_size, lzma_dict_size=cfgs.lzma_dict_size)
        except ErofsMountError as exc:
            raise type(exc)(f"{self._where(inode, ext)}: {exc}", errno=exc.errno) from None
        except Exception as exc:    # a codec library failing in an unexpected way on garbage
            raise CorruptedError(f"{self._where(inode, ext)}: {type(exc).__name__}: {exc}") from None
        if len(data) != ext.llen:   # decompress() guarantees it; keep wrong bytes out regardless
            raise CorruptedError(f"{self._where(inode, ext)}: decoded {len(data)} bytes, expected {ext.llen}")
        done[2] += len(data)
        return data

    @staticmethod
    def _where(inode, ext: ZExtent) -> str:
        return (f"inode {inode.nid}: {D.algorithm_name(ext.alg)} pcluster at byte {ext.pa} "
                f"({ext.plen} bytes) for logical offset {ext.la}")

    def _read_pcluster(self, pa: int, plen: int) -> bytes:
        mapped = getattr(self.img, "read_mapped", None)     # multi-device aware, if the Image offers it
        if mapped is not None:
            return mapped(0, pa, plen)
        return self.img.read_raw(pa, plen)
