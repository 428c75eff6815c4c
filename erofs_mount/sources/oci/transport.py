"""The ``httpx.Auth`` hook of the registry client (TLS contexts and origins: ``sources/httpblob.py``).

``RegistryAuth`` is an ``httpx.Auth`` whose ``async_auth_flow`` (the shape of httpx ``_auth.py``
``DigestAuth``) sends the client's current Authorization and, on a 401, asks the client to answer
the challenge once (client.py fetches and caches the tokens).  It only ever decorates requests to
the registry's own origin, so nothing leaks to a redirect target we reuse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from ..httpblob import origin
from .auth import parse_www_authenticate, pick_challenge

if TYPE_CHECKING:  # pragma: no cover
    from .client import RegistryClient


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
