"""Registry authentication decisions (PURE: no I/O).

- ``WWW-Authenticate`` challenges (RFC 7235 syntax; the registry token flow of
  distribution's ``docs/spec/auth/token.md``: ``Bearer realm=…,service=…,scope=…``).
- token responses (``token`` or ``access_token``, ``expires_in`` default 60 s).
- a per-scope token cache with expiry.
- credential look-up in parsed Docker ``config.json`` / containers ``auth.json``
  documents (the file reading and helper execution live in ``credentials.py``).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

from ...errors import AuthError, RegistryError
from .reference import Reference

TOKEN_DEFAULT_TTL = 60  # token.md: "If omitted, 60 seconds should be assumed"
TOKEN_MARGIN = 10  # refresh this many seconds before the announced expiry


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower-case: "bearer", "basic"
    params: dict

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


_TOKEN68 = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*(,|$)')


def parse_www_authenticate(values: list[str]) -> list[Challenge]:
    """Every challenge in the header values (one value may hold several)."""
    out: list[Challenge] = []
    for value in values:
        rest = value.strip()
        while rest:
            m = re.match(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:\s+|$)", rest)
            if not m:
                break
            scheme, rest = m.group(1).lower(), rest[m.end():]
            params: dict = {}
            while True:
                pm = _TOKEN68.match(rest)
                if not pm:
                    break
                key, val = pm.group(1).lower(), pm.group(2)
                if val.startswith('"'):
                    val = re.sub(r"\\(.)", r"\1", val[1:-1])
                params[key] = val
                rest = rest[pm.end():]
            out.append(Challenge(scheme, params))
            rest = rest.lstrip(", ")
    return out


def pick_challenge(challenges: list[Challenge]) -> Challenge | None:
    for scheme in ("bearer", "basic"):
        for c in challenges:
            if c.scheme == scheme:
                return c
    return None


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float  # monotonic seconds


def parse_token_response(body: bytes, now: float) -> Token:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RegistryError("token endpoint answered something that is not JSON") from None
    tok = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
    if not isinstance(tok, str) or not tok:
        raise RegistryError("token endpoint answered no token")
    ttl = doc.get("expires_in", TOKEN_DEFAULT_TTL)
    if not isinstance(ttl, (int, float)) or ttl <= 0:
        ttl = TOKEN_DEFAULT_TTL
    return Token(tok, now + max(1.0, ttl - TOKEN_MARGIN) if ttl > 2 * TOKEN_MARGIN else now + ttl / 2)


class TokenCache:
    """Tokens per (realm, service, scope); expired ones are never handed out."""

    def __init__(self) -> None:
        self._tokens: dict[tuple, Token] = {}

    def get(self, key: tuple, now: float) -> Token | None:
        tok = self._tokens.get(key)
        if tok is not None and tok.expires_at <= now:
            del self._tokens[key]
            return None
        return tok

    def put(self, key: tuple, token: Token) -> None:
        self._tokens[key] = token

    def invalidate(self, key: tuple, token: Token | None = None) -> None:
        """Drop *key* (only if it still holds *token*, when given)."""
        if token is None or self._tokens.get(key) == token:
            self._tokens.pop(key, None)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str
    origin: str  # where they came from, for messages ("oci.password_file", "config.json", …)
    identity_token: bool = False  # Docker's "<token>" user: the secret is an OAuth2 refresh token

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:  # never print secrets
        return f"Credentials(username={self.username!r}, origin={self.origin!r})"


def _host_of_key(key: str) -> str:
    """config.json keys: "host:port", "https://host:port", "https://index.docker.io/v1/"…"""
    k = key.strip()
    if "://" in k:
        k = k.split("://", 1)[1]
    return k.split("/", 1)[0].lower()


def _registry_matches(key: str, ref: Reference) -> bool:
    host = _host_of_key(key)
    if ref.is_docker_hub:
        return host in ("index.docker.io", "docker.io", "registry-1.docker.io")
    return host == ref.registry.lower()


def decode_auth_entry(entry: object, origin: str) -> Credentials | None:
    """One ``auths`` entry: ``auth`` = base64(user:pass), or username/password, or identitytoken."""
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, sep, pw = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise AuthError(f"{origin}: malformed base64 'auth' entry") from None
        if not sep:
            raise AuthError(f"{origin}: 'auth' entry is not base64(user:password)")
        if entry.get("identitytoken"):
            return Credentials(user, entry["identitytoken"], origin, identity_token=True)
        return Credentials(user, pw, origin)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"], origin)
    return None


@dataclass(frozen=True, slots=True)
class HelperLookup:
    """Ask ``docker-credential-<helper> get`` with *server_url* on stdin."""

    helper: str
    server_url: str
    origin: str


def lookup_docker_config(doc: object, ref: Reference, origin: str) -> Credentials | HelperLookup | None:
    """Docker's order: credHelpers[registry], then credsStore, then auths."""
    if not isinstance(doc, dict):
        return None
    helpers = doc.get("credHelpers") if isinstance(doc.get("credHelpers"), dict) else {}
    for key, helper in helpers.items():
        if isinstance(helper, str) and helper and _registry_matches(key, ref):
            return HelperLookup(helper, ref.config_keys()[0], f"{origin} credHelpers")
    store = doc.get("credsStore")
    auths = doc.get("auths") if isinstance(doc.get("auths"), dict) else {}
    for key, entry in auths.items():
        if _registry_matches(key, ref):
            creds = decode_auth_entry(entry, origin)
            if creds is not None:
                return creds
    if isinstance(store, str) and store:
        return HelperLookup(store, ref.config_keys()[0], f"{origin} credsStore")
    return None


def lookup_auth_json(doc: object, ref: Reference, origin: str) -> Credentials | None:
    """containers-auth.json(5): ``auths`` keyed by host or host/namespace (most specific first)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("auths"), dict):
        return None
    auths = doc["auths"]
    host = "docker.io" if ref.is_docker_hub else ref.registry
    parts = ref.repository.split("/")
    for n in range(len(parts), -1, -1):
        key = "/".join([host, *parts[:n]])
        if key in auths:
            creds = decode_auth_entry(auths[key], origin)
            if creds is not None:
                return creds
    for key, entry in auths.items():  # legacy spellings with a scheme
        if "://" in key and _registry_matches(key, ref):
            creds = decode_auth_entry(entry, origin)
            if creds is not None:
                return creds
    return None


def parse_helper_output(out: bytes, helper: str) -> Credentials | None:
    """``{"ServerURL","Username","Secret"}``; None when the helper knows nothing."""
    try:
        doc = json.loads(out)
    except (ValueError, UnicodeDecodeError):
        raise AuthError(f"docker-credential-{helper}: output is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("Secret"), str):
        return None
    user = doc.get("Username") if isinstance(doc.get("Username"), str) else ""
    if user == "<token>":
        return Credentials(user, doc["Secret"], f"docker-credential-{helper}", identity_token=True)
    return Credentials(user, doc["Secret"], f"docker-credential-{helper}")
