"""Registry HTTP client (async, httpx on trio): auth, manifests, blob ranges, retries.

- 401 challenges are answered through ``transport.RegistryAuth``: Basic with the
  credentials, Bearer by fetching a token from the challenge's realm (with the
  credentials as Basic, an identity token as an OAuth2 refresh-token grant, or
  anonymously) for its service and scope.  Tokens are cached per (realm,
  service, scope), used until their ``expires_in`` runs out and refreshed on a 401.
- every request is retried by ``RetryPolicy`` on 5xx/429/resets/truncation/
  stalls, bounded in attempts and in time; then ``NetworkError`` (EIO).
- blob redirects are followed (httpx drops Authorization across origins) and
  the target is reused for later ranges until it fails.
- blob ranges are delivered piece by piece as they stream in; a long paced
  stream (read-ahead) waits for its consumer between pieces without reading the
  socket, bounded by time without progress rather than by its length.
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

from ... import __version__
from ...errors import AuthError, NetworkError, RegistryError, UsageError
from ..retry import RETRY_STATUS, RetryPolicy, parse_retry_after
from .auth import Challenge, Credentials, Token, TokenCache, parse_token_response, pull_scope
from .credentials import find_credentials
from .manifest import ACCEPT, verify_digest, sha256_digest
from .options import OciOptions
from .reference import Reference
from .transport import RegistryAuth, is_cert_error, make_ssl_context

log = logging.getLogger("erofs_mount.sources.oci")
T = TypeVar("T")
_MIN_RATE = 1 << 20  # bytes/s a body must at least sustain before an attempt is called stalled
_MANIFEST_MAX = 4 << 20


class _Retry(Exception):
    """One failed attempt worth retrying."""

    def __init__(self, reason: str, retry_after: float | None = None, *, immediate: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = 0.0 if immediate else retry_after


class _Budget:
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


class RegistryClient:
    """One registry repository, as seen by one source."""

    def __init__(self, ref: Reference, options: OciOptions, *, env: dict | None = None, endpoint=None) -> None:
        """*endpoint*: a mirrors.Endpoint to talk to instead of *ref*'s registry (a mirror, or a
        rewritten location): *ref* is then that host's view (its registry and repository)."""
        if options.insecure and ref.is_docker_hub:
            raise UsageError("oci.insecure (plain HTTP) is refused for Docker Hub")
        self.ref = ref
        self.options = options
        self.env = env
        if endpoint is None:
            scheme, host, self._api_root, self._params = ("http" if options.insecure else "https"), ref.api_host, "/v2", {}
            cafiles: tuple = (options.cafile,) if options.cafile else ()
            skip_verify = False
        else:
            scheme, host, self._api_root = endpoint.scheme, endpoint.host, endpoint.api_root
            self._params = {"ns": endpoint.ns} if endpoint.ns else {}
            cafiles = endpoint.cafiles or ((options.cafile,) if options.cafile and endpoint.origin else ())
            skip_verify = endpoint.skip_verify
        self.base_url = httpx.URL(f"{scheme}://{host}")
        verify: ssl.SSLContext | bool = True
        if scheme == "https":
            what = f"{endpoint.source} ca" if endpoint is not None and endpoint.cafiles else "oci.cafile"
            verify = False if skip_verify else make_ssl_context(*cafiles, what=what)
        t = options.timeout
        headers = {"User-Agent": f"erofs-mount/{__version__}"}
        for k, v in (endpoint.headers if endpoint is not None else ()):
            headers[k] = v
        self.http = httpx.AsyncClient(
            verify=verify,
            timeout=httpx.Timeout(connect=t, read=t, write=t, pool=max(t, options.retry_time)),
            limits=httpx.Limits(max_connections=options.connections + 4, max_keepalive_connections=options.connections + 4),
            headers=headers,
            follow_redirects=False,
        )
        self.auth = RegistryAuth(self)
        self.policy = RetryPolicy(retries=options.retries, total=options.retry_time)
        self.counters: Counter = Counter()
        self._creds: Credentials | None = None
        self._creds_loaded = False
        self._basic: str | None = None
        self._bearer: tuple | None = None  # (key, Token) last used
        self._challenge: Challenge | None = None
        self._tokens = TokenCache()
        self._token_lock = trio.Lock()
        self._blob_urls: dict[str, httpx.URL] = {}

    # -- auth -------------------------------------------------------------------------
    async def credentials(self) -> Credentials | None:
        if not self._creds_loaded:
            self._creds = await find_credentials(self.ref, self.options, self.env)
            self._creds_loaded = True
        return self._creds

    def _token_key(self, ch: Challenge) -> tuple:
        scope = ch.params.get("scope") or pull_scope(self.ref.repository)
        return (ch.realm, ch.params.get("service"), scope)

    async def current_authorization(self) -> str | None:
        """The header to send up front: Basic, or a live token (an expired one is renewed first,
        saving the 401 round trip)."""
        if self._basic:
            return self._basic
        if self._bearer is not None:
            key, _ = self._bearer
            tok = self._tokens.get(key, trio.current_time())
            if tok is not None:
                return f"Bearer {tok.value}"
            if self._challenge is not None:
                return await self.answer_challenge(self._challenge, None)
            self._bearer = None
        return None

    async def answer_challenge(self, ch: Challenge, sent: str | None) -> str | None:
        """Authorization header to retry with, or None to let the 401 through."""
        creds = await self.credentials()
        if ch.scheme == "basic":
            if creds is None or (sent is not None and sent == creds.basic_header()):
                return None  # nothing (new) to offer
            self._basic = creds.basic_header()
            return self._basic
        if ch.scheme != "bearer" or not ch.realm:
            return None
        key = self._token_key(ch)
        self._challenge = ch
        async with self._token_lock:
            now = trio.current_time()
            tok = self._tokens.get(key, now)
            if tok is not None and f"Bearer {tok.value}" == sent:
                self._tokens.invalidate(key, tok)  # refused: expired or revoked
                tok = None
            if tok is None:
                tok = await self._fetch_token(ch, key, creds)
                self._tokens.put(key, tok)
            self._bearer = (key, tok)
        return f"Bearer {tok.value}"

    async def _fetch_token(self, ch: Challenge, key: tuple, creds: Credentials | None) -> Token:
        realm, service, scope = key
        try:
            url = httpx.URL(realm)
        except (httpx.InvalidURL, TypeError):
            raise RegistryError(f"registry {self.ref.registry}: bad token realm {realm!r}") from None
        params = {"scope": scope}
        if service:
            params["service"] = service
        if creds is not None and creds.identity_token:
            params["offline_token"] = "true"
        headers = {}
        if creds is not None and not creds.identity_token:
            headers["Authorization"] = creds.basic_header()

        async def attempt(_budget: _Budget) -> Token:
            if creds is not None and creds.identity_token:  # OAuth2 refresh-token grant (token.md)
                data = {"grant_type": "refresh_token", "refresh_token": creds.password, "service": service or "",
                        "scope": scope, "client_id": "erofs-mount"}
                resp = await self.http.post(url, data=data)
            else:
                resp = await self.http.get(url.copy_merge_params(params), headers=headers)
            self.counters["token_requests"] += 1
            if resp.status_code in (401, 403):
                who = f"the credentials from {creds.origin}" if creds else "anonymous access"
                raise AuthError(f"registry {self.ref.registry}: token service {url.host} refused {who} (HTTP {resp.status_code})")
            self._raise_for_retry(resp)
            if resp.status_code != 200:
                raise RegistryError(f"registry {self.ref.registry}: token service answered HTTP {resp.status_code}")
            return parse_token_response(resp.content, trio.current_time())

        return await self._with_retries(f"token {url.host}", attempt)

    def auth_failure(self, status: int) -> AuthError:
        creds = self._creds
        if status == 401 and creds is None:
            return AuthError(f"registry {self.ref.registry} requires authentication and no credentials were found"
                             " (-o oci.username/oci.password_file, EROFS_MOUNT_USERNAME, docker login)")
        if status == 401:
            return AuthError(f"registry {self.ref.registry} refused the credentials from {creds.origin} (HTTP 401)")
        return AuthError(f"registry {self.ref.registry}: access to {self.ref.repository} denied (HTTP {status})")

    # -- retries ------------------------------------------------------------------------
    def _raise_for_retry(self, resp: httpx.Response) -> None:
        if resp.status_code in RETRY_STATUS:
            raise _Retry(f"HTTP {resp.status_code}", parse_retry_after(resp.headers.get("retry-after"), time.time()))

    async def _with_retries(self, what: str, attempt: Callable[["_Budget"], Awaitable[T]], *,
                            size_hint: int = 0) -> T:
        """Run ``attempt(budget)`` until it returns, retrying per the policy.

        Each attempt is bounded by ``budget.scope`` (the stall timeout plus the time *size_hint*
        bytes take at ``_MIN_RATE``), all of them by ``retry_time`` from ``budget.start``, which
        a paced stream moves on (``_Budget.consumer``)."""
        budget = _Budget(trio.current_time(), self.policy.total)
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
                        raise NetworkError(f"registry {self.ref.registry}: TLS certificate not trusted ({exc});"
                                           " give the CA with -o oci.cafile=") from None
                    reason = f"{type(exc).__name__}: {exc or 'connection error'}"
                if reason is None:  # the attempt's scope ran out
                    reason = f"no complete answer within {limit:.1f} s"
            elapsed = trio.current_time() - budget.start
            delay = self.policy.delay(n, retry_after, elapsed)
            if delay is None:
                self.counters["failures"] += 1
                msg = f"registry {self.ref.registry}: {what}: gave up after {n} attempt{'s' if n > 1 else ''} in {elapsed:.1f} s: {reason}"
                log.error("%s", msg)
                raise NetworkError(msg)
            self.counters["retries"] += 1
            log.warning("%s: %s; retry %d in %.2f s", what, reason, n, delay)
            await trio.sleep(delay)

    # -- requests ---------------------------------------------------------------------
    def api_url(self, path: str) -> httpx.URL:
        """``<api root>/<repository>/<path>`` on this client's host (with a mirror's ``ns=``)."""
        url = self.base_url.join(f"{self._api_root}/{self.ref.repository}/{path}")
        return url.copy_merge_params(self._params) if self._params else url

    def _check(self, resp: httpx.Response, what: str) -> None:
        if resp.status_code in (401, 403):
            raise self.auth_failure(resp.status_code)
        self._raise_for_retry(resp)
        if resp.status_code == 404:
            err = RegistryError(f"registry {self.ref.registry}: {what} not found (HTTP 404)")
            err.http_status = 404   # a mirror without it: the next host is asked (mirrored.py)
            raise err

    async def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(body, content type, digest) of manifest *reference* (tag or digest); digest checked."""
        url = self.api_url(f"manifests/{reference}")
        what = f"manifest {self.ref.repository}:{reference}" if ":" not in reference else f"manifest {reference}"

        async def attempt(_budget: _Budget) -> tuple[bytes, str, str]:
            resp = await self.http.get(url, headers={"Accept": ACCEPT}, auth=self.auth, follow_redirects=True)
            self.counters["requests"] += 1
            self._check(resp, what)
            if resp.status_code != 200:
                raise RegistryError(f"registry {self.ref.registry}: {what}: unexpected HTTP {resp.status_code}")
            body = resp.content
            if len(body) > _MANIFEST_MAX:
                raise RegistryError(f"{what}: larger than {_MANIFEST_MAX} bytes")
            return body, resp.headers.get("content-type", ""), resp.headers.get("docker-content-digest", "")

        body, ctype, header_digest = await self._with_retries(what, attempt)
        if reference.startswith("sha"):
            verify_digest(body, reference)
            digest = reference
        else:
            digest = sha256_digest(body)
            if header_digest.startswith("sha256:") and header_digest != digest:
                raise RegistryError(f"{what}: Docker-Content-Digest {header_digest} does not match the body ({digest})")
        return body, ctype, digest

    async def fetch_range(self, digest: str, start: int, end: int, *, piece: int | None = None,
                          deliver: Callable[[int, bytes], None] | None = None,
                          pace: Callable[[int], Awaitable[None]] | None = None) -> bytes | None:
        """The bytes [start, end) of blob *digest* (the caller clamps to its size).

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
        registry_url = self.api_url(f"blobs/{digest}")
        pos = start  # the first byte not delivered yet
        progress_limit = self.options.timeout * 2 + piece / _MIN_RATE

        async def attempt(budget: _Budget) -> None:
            nonlocal pos
            url = self._blob_urls.get(digest, registry_url)
            cached = url is not registry_url
            headers = {"Range": f"bytes={pos}-{end - 1}", "Accept-Encoding": "identity"}
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
                    self._check(resp, f"blob {digest}")
                    raise RegistryError(f"registry {self.ref.registry}: blob {digest}: unexpected HTTP {resp.status_code}")
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

        await self._with_retries(f"blob {digest[:19]} bytes={start}-{end - 1}", attempt,
                                 size_hint=piece if pace is not None else end - start)
        return None

    async def aclose(self) -> None:
        await self.http.aclose()
