"""Backend-neutral pieces of ``erofs-mount status`` (pure: no I/O).

    summary(doc) -> dict     the figures status prints from a daemon's published statistics document
                             (NBD: backends/nbd/publish.py; FUSE: backends/fuse/publish.py)
    size_text(n), ratio_text(r)   how they are printed
"""

from __future__ import annotations

from typing import Any

__all__ = ["SOURCE_STAT_KEYS", "summary", "size_text", "ratio_text", "verity_counts", "verity_text", "hosts_text"]

# the integer statistics of a block source (OciBlobSource.stats(), LocalSource.stats()) that a daemon
# publishes for `erofs-mount status`; bytes_fetched + bytes_discarded = bytes that came off the network
SOURCE_STAT_KEYS = ("size", "bytes_fetched", "bytes_discarded", "requests", "retries", "failures", "direct_reads",
                    "token_requests", "cache_hits", "cache_misses", "disk_hits", "disk_bytes_written",
                    "disk_errors", "reads", "coalesced", "prefetched_chunks", "fetch_failures", "streams",
                    "streams_active", "dropped_behind", "chunk_size",
                    # +zstd layers (sources/oci/zstdsource.py)
                    "compressed_size", "frames_decoded", "bytes_decompressed", "frame_errors",
                    # tar layers (sources/tarlayer/): the index, the tar, gzip spans decoded
                    "tar_index_bytes", "tar_bytes", "spans_decoded", "spans_prefetched", "gz_bytes_in",
                    "gz_bytes_out", "span_cache_hits", "span_cache_misses",
                    # verified reads (verity/source.py)
                    "verity_blocks_verified", "verity_blocks_failed", "verity_hash_blocks_loaded",
                    "verity_refetches", "verity_failures", "verity_uncached_chunks", "verity_gated_reads")


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def summary(doc: dict | None) -> dict:
    """Bytes fetched (this daemon and since the mount), cache hit ratio (chunk look-ups served from
    memory or the persistent cache), retries.  ``carried``: what earlier daemons of the same mount
    fetched (NBD reattach); absent for FUSE."""
    doc = doc or {}
    st, carried = doc.get("stats") or {}, doc.get("carried") or {}
    hits, misses, disk = (_int(st.get(k)) for k in ("cache_hits", "cache_misses", "disk_hits"))
    lookups = hits + misses
    ratio = None if not lookups or "cache_hits" not in st else min(1.0, (hits + disk) / lookups)
    return {
        "bytes_fetched": _int(st.get("bytes_fetched")),
        "bytes_fetched_total": _int(st.get("bytes_fetched")) + _int(carried.get("bytes_fetched")),
        "cache_hit_ratio": ratio,
        "retries": _int(st.get("retries")),
        "retries_total": _int(st.get("retries")) + _int(carried.get("retries")),
        "daemons": _int(carried.get("daemons")) + 1,
        "updated": doc.get("updated"),
        "verity": verity_counts(st),
        "hosts": st.get("hosts") if isinstance(st.get("hosts"), dict) else None,
    }


def verity_counts(st: dict) -> tuple[int, int] | None:
    """(blocks verified, blocks failed) of a verified source's statistics; None when unverified."""
    if "verity_blocks_verified" not in st:
        return None
    return _int(st.get("verity_blocks_verified")), _int(st.get("verity_blocks_failed"))


def hosts_text(hosts: dict | None) -> str:
    """`` hosts=HOST=SIZE,…``: blob bytes each registry host served (mirrors first), or ""."""
    if not hosts:
        return ""
    return " hosts=" + ",".join(f"{host}={size_text(_int(n))}" for host, n in hosts.items())


def verity_text(counts: tuple[int, int] | None) -> str:
    return "verity=off" if counts is None else f"verity=verified:{counts[0]},failed:{counts[1]}"


def size_text(n: int) -> str:
    return f"{n}({n / 2**20:.1f}MiB)"


def ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}"
