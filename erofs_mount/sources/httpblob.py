"""The HTTP side every remote blob shares (registry blobs, S3 objects): one httpx client on trio,
bounded retries, and Range GETs delivered piece by piece as they stream in.

- every request is retried by ``RetryPolicy`` on 5xx/429/resets/truncation/stalls, bounded in
  attempts and in time; then ``NetworkError`` (EIO).
- blob redirects are followed (httpx drops Authorization across origins) and the target is
  reused for later ranges until it fails.
- a long paced stream (read-ahead) waits for its consumer between pieces without reading the
  socket, bounded by time without progress rather than by its length.

Subclasses (``oci/client.py`` RegistryClient, ``s3/client.py`` S3Client) say where a blob is
(``blob_url``), what to send with it (``blob_headers``, ``auth``), what an error answer means
(``check_blob``) and what a good answer must show (``check_body``: S3's pinned ETag).
"""

from __future__ import annotations

import logging
import math
import re
import ssl
import time
from collections import Counter
from typing import Awaitable, Callable, TypeVar

import httpx
import trio

from .. import __version__
from ..errors import NetworkError, SourceError, UsageError
from .retry import RETRY_STATUS, RetryPolicy, parse_retry_after

log = logging.getLogger("erofs_mount.sources.http")
T = TypeVar("T")
_MIN_RATE = 1 << 20  # bytes/s a body must at least sustain before an attempt is called stalled


def origin(url: httpx.URL) -> tuple:
    return (url.scheme, url.host, url.port)


def is_cert_error(exc: BaseException) -> bool:
    """Is an ssl certificate verification failure anywhere in the exception chain?"""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 16:
        if isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def make_ssl_context(*cafiles: str | None, what: str = "oci.cafile") -> ssl.SSLContext:
    """System CAs (not certifi) plus *cafiles* (oci.cafile, s3.cafile, a hosts.toml ``ca`` list: *what* says which)."""
    ctx = ssl.create_default_context()
    for cafile in cafiles:
        if not cafile:
            continue
        try:
            ctx.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"{what}={cafile}: {exc}") from None
    return ctx


class _Retry(Exception):
    """One failed attempt worth retrying."""

    def __init__(self, reason: str, retry_after: float | None = None, *, immediate: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = 0.0 if immediate else retry_after


class Budget:
    """Time bounds of one ``_with_retries`` call: ``scope`` bounds the current attempt and
    ``retry_time`` counts from ``start``."""

    __slots__ = ("start", "total", "scope")

    def __init__(self, start: float, total: float) -> None:
        self.start = start
        self.total = total
        self.scope = trio.CancelScope()

    @property
    def deadline(self) -> float:
        return self.start + self.total

    async def consumer(self, waiting: Awaitable[None], stall: float) -> None:
        """A paced stream after a piece arrived: await *waiting* (its reader) unbounded, then
        give the attempt *stall* seconds for the next piece; ``retry_time`` restarts (time
        spent waiting for the reader is not the registry failing; the bound is on time
        without progress)."""
        self.scope.deadline = math.inf
        await waiting
        now = trio.current_time()
        self.start = now
        self.scope.deadline = now + stall


async def read_error_body(resp: httpx.Response, limit: int = 64 << 10) -> bytes:
    """An error answer's body, at most *limit* bytes (``check_blob`` reads what it says: S3's
    error code); a longer one is cut there, the rest left unread."""
    parts: list[bytes] = []
    got = 0
    async for data in resp.aiter_bytes():
        parts.append(data)
        got += len(data)
        if got >= limit:
            break
    return b"".join(parts)[:limit]


class HttpBlobClient:
    """One remote store of blobs, as seen by one source: an httpx client, a retry policy, counters."""

    label = "remote"            # "registry HOST", "s3://BUCKET": the start of every message
    blob_noun = "blob"
    cafile_hint = "give the CA with -o oci.cafile="
    auth: httpx.Auth | None = None

    def __init__(self, options, *, base_url: str, verify: "ssl.SSLContext | bool",
                 headers: dict[str, str] | None = None) -> None:
        """*options*: an OciOptions (timeouts, retries, connections)."""
        self.options = options
        self.base_url = httpx.URL(base_url)
        t = options.timeout
        self.http = httpx.AsyncClient(
            verify=verify,
            timeout=httpx.Timeout(connect=t, read=t, write=t, pool=max(t, options.retry_time)),
            limits=httpx.Limits(max_connections=options.connections + 4, max_keepalive_connections=options.connections + 4),
            headers={"User-Agent": f"erofs-mount/{__version__}", **(headers or {})},
            follow_redirects=False,
        )
        self.policy = RetryPolicy(retries=options.retries, total=options.retry_time)
        self.counters: Counter = Counter()
        self._blob_urls: dict[str, httpx.URL] = {}

    # -- what a subclass says ----------------------------------------------------------------
    def blob_url(self, key: str) -> httpx.URL:
        raise NotImplementedError

    def blob_headers(self, key: str) -> dict[str, str]:
        return {}

    def check_blob(self, resp: httpx.Response, key: str, body: bytes = b"") -> None:
        """Raise what an error answer to a blob GET means (retry, auth, not found); *body*: the
        first bytes of the answer (``read_error_body``)."""
        self._raise_for_retry(resp)

    def check_body(self, resp: httpx.Response, key: str) -> None:
        """Raise when a 200/206 answer is not the blob asked for (before its body is read)."""

    def unexpected(self, resp: httpx.Response, what: str, body: bytes = b"") -> SourceError:
        return SourceError(f"{self.label}: {what}: unexpected HTTP {resp.status_code}")

    # -- retries ------------------------------------------------------------------------
    def _raise_for_retry(self, resp: httpx.Response) -> None:
        if resp.status_code in RETRY_STATUS:
            raise _Retry(f"HTTP {resp.status_code}", parse_retry_after(resp.headers.get("retry-after"), time.time()))

    async def _with_retries(self, what: str, attempt: Callable[["Budget"], Awaitable[T]], *,
                            size_hint: int = 0) -> T:
        """Run ``attempt(budget)`` until it returns, retrying per the policy.

        Each attempt is bounded by ``budget.scope`` (the stall timeout plus the time *size_hint*
        bytes take at ``_MIN_RATE``), all of them by ``retry_time`` from ``budget.start``, which
        a paced stream moves on (``Budget.consumer``)."""
        budget = Budget(trio.current_time(), self.policy.total)
        n = 0
        while True:
            n += 1
            now = trio.current_time()
            limit = min(self.options.timeout * 2 + size_hint / _MIN_RATE, budget.deadline - now)
            reason: str | None = None
            retry_after: float | None = None
            if limit <= 0:
                reason = "out of time"
            else:
                budget.scope = trio.CancelScope(deadline=now + limit)
                try:
                    with budget.scope:
                        return await attempt(budget)
                except _Retry as exc:
                    reason, retry_after = exc.reason, exc.retry_after
                except httpx.TransportError as exc:
                    if is_cert_error(exc):
                        raise NetworkError(f"{self.label}: TLS certificate not trusted ({exc}); {self.cafile_hint}") from None
                    reason = f"{type(exc).__name__}: {exc or 'connection error'}"
                if reason is None:  # the attempt's scope ran out
                    reason = f"no complete answer within {limit:.1f} s"
            elapsed = trio.current_time() - budget.start
            delay = self.policy.delay(n, retry_after, elapsed)
            if delay is None:
                self.counters["failures"] += 1
                msg = f"{self.label}: {what}: gave up after {n} attempt{'s' if n > 1 else ''} in {elapsed:.1f} s: {reason}"
                log.error("%s", msg)
                raise NetworkError(msg)
            self.counters["retries"] += 1
            log.warning("%s: %s; retry %d in %.2f s", what, reason, n, delay)
            await trio.sleep(delay)

    async def fetch_range(self, digest: str, start: int, end: int, *, piece: int | None = None,
                          deliver: Callable[[int, bytes], None] | None = None,
                          pace: Callable[[int], Awaitable[None]] | None = None) -> bytes | None:
        """The bytes [start, end) of blob *digest* (S3: the object; *digest* is then its cache key) (the caller clamps to its size).

        With *deliver*, the range is handed over as it streams in, in consecutive pieces of
        *piece* bytes (the last one may be shorter) by ``deliver(offset, data)``, and None is
        returned; a retry after a failure mid-body asks only for what was not delivered yet.
        Without it the whole range is returned.

        With *pace* (a long stream), ``await pace(next_offset)`` follows every delivery and may
        wait for the consumer: the socket is not read meanwhile (TCP flow control holds the
        server back).  The attempt's bound is then per piece (the stall timeout plus a piece at
        ``_MIN_RATE``, renewed by each one) and ``retry_time`` counts time without progress;
        the time spent in *pace* counts against neither.  ``retries`` still bounds the attempts."""
        if not 0 <= start < end:
            raise ValueError(f"bad range {start}-{end}")
        if deliver is None:
            out: list[bytes] = []
            await self.fetch_range(digest, start, end, piece=end - start, deliver=lambda _o, d: out.append(d))
            return out[0]
        piece = piece or (end - start)
        registry_url = self.blob_url(digest)
        pos = start  # the first byte not delivered yet
        progress_limit = self.options.timeout * 2 + piece / _MIN_RATE

        async def attempt(budget: Budget) -> None:
            nonlocal pos
            url = self._blob_urls.get(digest, registry_url)
            cached = url is not registry_url
            headers = {"Range": f"bytes={pos}-{end - 1}", "Accept-Encoding": "identity", **self.blob_headers(digest)}
            try:
                req = self.http.build_request("GET", url, headers=headers)
                resp = await self.http.send(req, auth=self.auth, follow_redirects=True, stream=True)
            except httpx.TransportError:
                if cached:
                    self._blob_urls.pop(digest, None)
                raise
            self.counters["requests"] += 1
            received = counted = 0  # body bytes in, and those already counted in bytes_fetched
            try:
                if resp.history and not cached:
                    self.counters["redirects"] += 1
                    self._blob_urls[digest] = resp.url
                if resp.status_code not in (200, 206):
                    if cached:  # e.g. an expired pre-signed URL: go back to the registry
                        self._blob_urls.pop(digest, None)
                        raise _Retry(f"redirect target answered HTTP {resp.status_code}", immediate=True)
                    body = await read_error_body(resp)
                    self.check_blob(resp, digest, body)
                    raise self.unexpected(resp, f"blob {digest}", body)
                self.check_body(resp, digest)
                skip = 0
                if resp.status_code == 206:
                    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("content-range", "").strip())
                    if not m or int(m.group(1)) != pos or int(m.group(2)) != end - 1:
                        raise _Retry(f"Content-Range {resp.headers.get('content-range')!r} for bytes={pos}-{end - 1}")
                else:  # the Range was ignored: skip to our bytes in the full body
                    self.counters["range_ignored"] += 1
                    skip = pos
                # a piece is the received buffers joined: one copy, in C (none when one buffer is a piece)
                parts: list = []
                filled, want = 0, min(piece, end - pos)
                async for data in resp.aiter_raw():
                    received += len(data)
                    if skip:
                        if len(data) <= skip:
                            skip -= len(data)
                            continue
                        data, skip = memoryview(data)[skip:], 0
                    while data and pos < end:
                        k = want - filled
                        if len(data) <= k:
                            parts.append(data)
                            filled += len(data)
                            data = b""
                        else:
                            view = memoryview(data)
                            parts.append(view[:k])
                            filled, data = want, view[k:]
                        if filled == want:
                            one = parts[0]
                            deliver(pos, one if len(parts) == 1 and type(one) is bytes else b"".join(parts))
                            pos += want
                            counted += want
                            self.counters["bytes_fetched"] += want
                            parts, filled, want = [], 0, min(piece, end - pos)
                            if pace is not None:
                                await budget.consumer(pace(pos), progress_limit)
                    if data and resp.status_code == 206:
                        raise _Retry(f"more bytes than the {end - start}-byte range asked for")
                    if pos >= end and resp.status_code == 200:
                        break  # the rest of a whole-blob answer is not ours (the connection is dropped)
                # a 206 is read to its end so that the connection goes back to the pool
                if pos < end:
                    if cached:
                        self._blob_urls.pop(digest, None)
                    raise _Retry(f"truncated body: {pos - start} of {end - start} bytes")
            finally:
                # bytes_fetched counts what was delivered; bytes_discarded what was received and
                # never delivered (the piece a stopped stream held, a 200's bytes before ours, the
                # piece a broken body cut): counted when the attempt ends
                self.counters["bytes_discarded"] += received - counted
                await resp.aclose()

        await self._with_retries(f"{self.blob_noun} {digest[:19]} bytes={start}-{end - 1}", attempt,
                                 size_hint=piece if pace is not None else end - start)
        return None

    async def aclose(self) -> None:
        await self.http.aclose()
