"""httpx plumbing of the registry client: TLS contexts, origins, and the ``httpx.Auth`` hook.

``RegistryAuth`` is an ``httpx.Auth`` whose ``async_auth_flow`` (the shape of httpx ``_auth.py``
``DigestAuth``) sends the client's current Authorization and, on a 401, asks the client to answer
the challenge once (client.py fetches and caches the tokens).  It only ever decorates requests to
the registry's own origin, so nothing leaks to a redirect target we reuse.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

import httpx

from ...errors import UsageError
from .auth import parse_www_authenticate, pick_challenge

if TYPE_CHECKING:  # pragma: no cover
    from .client import RegistryClient


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
    """System CAs (not certifi) plus oci.cafile (or a hosts.toml ``ca`` list: *what* says which)."""
    ctx = ssl.create_default_context()
    for cafile in cafiles:
        if not cafile:
            continue
        try:
            ctx.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"{what}={cafile}: {exc}") from None
    return ctx


class RegistryAuth(httpx.Auth):
    def __init__(self, client: "RegistryClient") -> None:
        self.client = client

    async def async_auth_flow(self, request: httpx.Request):
        c = self.client
        if origin(request.url) != origin(c.base_url):
            yield request  # a redirect target we reuse: never send our credentials there
            return
        sent = await c.current_authorization()
        if sent is not None:
            request.headers["Authorization"] = sent
        response = yield request
        if response.status_code != 401:
            return
        challenge = pick_challenge(parse_www_authenticate(response.headers.get_list("www-authenticate")))
        if challenge is None:
            return
        header = await c.answer_challenge(challenge, sent)
        if header is None:
            return
        request.headers["Authorization"] = header
        yield request

    def sync_auth_flow(self, request):  # pragma: no cover - the client is async only
        raise RuntimeError("RegistryAuth is async only")
