"""Registry HTTP client (async, httpx on trio): auth, manifests, blob ranges, retries.

- 401 challenges are answered through ``transport.RegistryAuth``: Basic with the
  credentials, Bearer by fetching a token from the challenge's realm (with the
  credentials as Basic, an identity token as an OAuth2 refresh-token grant, or
  anonymously) for its service and scope.  Tokens are cached per (realm,
  service, scope), used until their ``expires_in`` runs out and refreshed on a 401.
- retries, redirects and streamed blob ranges: ``sources/httpblob.py``
  (HttpBlobClient, shared with S3 objects).
"""

from __future__ import annotations

import logging
import ssl

import httpx
import trio

from ...errors import AuthError, RegistryError, UsageError
from ..httpblob import HttpBlobClient, Budget
from .auth import Challenge, Credentials, Token, TokenCache, parse_token_response, pull_scope
from .credentials import find_credentials
from .manifest import ACCEPT, verify_digest, sha256_digest
from .options import OciOptions
from .reference import Reference
from ..httpblob import make_ssl_context
from .transport import RegistryAuth

log = logging.getLogger("erofs_mount.sources.oci")
_MANIFEST_MAX = 4 << 20
class RegistryClient(HttpBlobClient):
    """One registry repository, as seen by one source."""

    def __init__(self, ref: Reference, options: OciOptions, *, env: dict | None = None, endpoint=None) -> None:
        """*endpoint*: a mirrors.Endpoint to talk to instead of *ref*'s registry (a mirror, or a
        rewritten location): *ref* is then that host's view (its registry and repository)."""
        if options.insecure and ref.is_docker_hub:
            raise UsageError("oci.insecure (plain HTTP) is refused for Docker Hub")
        self.ref = ref
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
        verify: ssl.SSLContext | bool = True
        if scheme == "https":
            what = f"{endpoint.source} ca" if endpoint is not None and endpoint.cafiles else "oci.cafile"
            verify = False if skip_verify else make_ssl_context(*cafiles, what=what)
        super().__init__(options, base_url=f"{scheme}://{host}", verify=verify,
                         headers=dict(endpoint.headers) if endpoint is not None else None)
        self.label = f"registry {ref.registry}"
        self.auth = RegistryAuth(self)
        self._creds: Credentials | None = None
        self._creds_loaded = False
        self._basic: str | None = None
        self._bearer: tuple | None = None  # (key, Token) last used
        self._challenge: Challenge | None = None
        self._tokens = TokenCache()
        self._token_lock = trio.Lock()

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

        async def attempt(_budget: Budget) -> Token:
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

    # -- requests ---------------------------------------------------------------------
    def api_url(self, path: str) -> httpx.URL:
        """``<api root>/<repository>/<path>`` on this client's host (with a mirror's ``ns=``)."""
        url = self.base_url.join(f"{self._api_root}/{self.ref.repository}/{path}")
        return url.copy_merge_params(self._params) if self._params else url

    def blob_url(self, key: str) -> httpx.URL:
        return self.api_url(f"blobs/{key}")

    def check_blob(self, resp: httpx.Response, key: str, body: bytes = b"") -> None:
        self._check(resp, f"blob {key}")

    def unexpected(self, resp: httpx.Response, what: str, body: bytes = b"") -> RegistryError:
        return RegistryError(f"registry {self.ref.registry}: {what}: unexpected HTTP {resp.status_code}")

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

        async def attempt(_budget: Budget) -> tuple[bytes, str, str]:
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

