"""A registry reference read through its mirrors (mirrors.py says which, in which order), the
origin last: one ``RegistryClient`` per host, so each keeps its own credentials and tokens.

* credentials: the origin's come from where they always do (``oci.username``…, the environment,
  Docker's and containers' files); a mirror gets only what the files hold for ITS host: the
  command line's and ``EROFS_MOUNT_USERNAME``'s are the origin's and never leave for a mirror.
* fallback: a mirror that fails (connection refused, reset, 5xx after its few retries, a refused
  login) is skipped for ``DOWN_FOR`` seconds; one that answers 404 is not asked for that blob or
  manifest again.  A range that breaks off mid-body goes on from the first byte not delivered, on
  the next host, so a reader sees no error as long as the origin answers.
* trust: whatever serves a blob, its bytes are checked as before (the persistent cache against the
  blob digest, dm-verity per block); when a check fails (``distrust``), the blob is read from the
  origin only from then on.  Manifests by digest are checked against the digest; a tag is
  resolved only by hosts allowed to (``resolve``).
* ``served``: bytes delivered per host, for ``status``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import Counter

import trio

from ...errors import AuthError, NetworkError, RegistryError, UsageError
from .client import RegistryClient
from .mirrors import Endpoint, default_origin, hosts_dir_names, merge_tables, parse_hosts_toml, \
    parse_registries_conf, plan
from .options import OciOptions
from .reference import Reference

log = logging.getLogger("erofs_mount.sources.oci")
DOWN_FOR = 30.0          # seconds a failed mirror is skipped
MIRROR_RETRIES = 1       # a mirror's attempts beyond the first: the next host is the retry
MIRROR_RETRY_TIME = 5.0
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
_ORIGIN_SECRETS = ("EROFS_MOUNT_USERNAME", "EROFS_MOUNT_PASSWORD")


# ------------------------------------------------------------------------------ configuration (I/O)
def registries_conf_files(options: OciOptions, env: dict) -> list[str]:
    """The registries.conf files to read, in loading order (containers-registries.conf(5) and .d(5)):
    ``oci.registries_conf`` or ``$CONTAINERS_REGISTRIES_CONF`` alone; else the user's file if it
    exists, else the system's, then the drop-ins (the user's only, when the user's file is used)."""
    if options.registries_conf:
        return [options.registries_conf]
    if env.get("CONTAINERS_REGISTRIES_CONF"):
        return [env["CONTAINERS_REGISTRIES_CONF"]]
    home = env.get("HOME") or os.path.expanduser("~")
    user = os.path.join(home, ".config", "containers", "registries.conf")
    user_d = user + ".d"
    if os.path.isfile(user):
        main, dirs = user, [user_d]
    else:
        main, dirs = "/etc/containers/registries.conf", ["/etc/containers/registries.conf.d", user_d]
    files = [main] if os.path.isfile(main) else []
    for d in dirs:
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".conf"))
        except OSError:
            continue
        files += [os.path.join(d, n) for n in names if os.path.isfile(os.path.join(d, n))]
    return files


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(1 << 20)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None


def load_endpoints(ref: Reference, options: OciOptions, env: dict) -> list[Endpoint]:
    """Every host for *ref* in the order to try (the origin last)."""
    if not options.mirrors:
        return [default_origin(ref, insecure=options.insecure)]
    tables = merge_tables([parse_registries_conf(_read(p), p) for p in registries_conf_files(options, env)])
    hosts = None
    root = options.hosts_dir or env.get("EROFS_MOUNT_HOSTS_DIR") or DEFAULT_HOSTS_DIR
    for name in hosts_dir_names(ref.registry):
        path = os.path.join(root, name, "hosts.toml")
        if os.path.isfile(path):
            hosts = parse_hosts_toml(_read(path), path, os.path.dirname(path), ref)
            break
    return plan(ref, insecure=options.insecure, tables=tables, hosts=hosts)


# ------------------------------------------------------------------------------ the client
class MirroredClient:
    """``RegistryClient``'s interface over every host of a reference."""

    def __init__(self, ref: Reference, options: OciOptions, *, env: dict | None = None,
                 endpoints: list[Endpoint] | None = None) -> None:
        self.ref = ref
        self.options = options
        self.env = env
        self._environ = dict(os.environ if env is None else env)
        self.endpoints = endpoints if endpoints is not None else load_endpoints(ref, options, self._environ)
        self._clients: dict[int, RegistryClient] = {}
        self._down: dict[int, float] = {}
        self._missing: set[tuple[int, str]] = set()
        self._distrusted: set[str] = set()
        self.served: Counter = Counter()
        self.origin = self._client(len(self.endpoints) - 1)   # built now: option errors surface at once
        if self.has_mirrors:
            log.info("%s: hosts %s", ref, ", ".join(e.name + ("" if e.origin else " (mirror)") for e in self.endpoints))

    # -- what the sources ask of a client ----------------------------------------------------
    @property
    def counters(self) -> Counter:
        total: Counter = Counter()
        for c in self._clients.values():
            total.update(c.counters)
        return total

    @property
    def _creds(self):
        return self.origin._creds

    async def credentials(self):
        return await self.origin.credentials()

    @property
    def has_mirrors(self) -> bool:
        return len(self.endpoints) > 1

    def distrust(self, digest: str) -> None:
        """A check of *digest*'s bytes failed: from now on only the origin serves it."""
        if digest not in self._distrusted and self.has_mirrors:
            self._distrusted.add(digest)
            log.warning("%s: blob %s did not check out; it is read from the origin %s only from now on",
                        self.ref, digest, self.endpoints[-1].name)

    async def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        by_digest = reference.startswith("sha")
        for i in self._order(by_digest, reference if by_digest else None):
            try:
                return await self._client(i).get_manifest(reference)
            except (NetworkError, RegistryError, AuthError) as exc:
                if self.endpoints[i].origin:
                    raise
                self._failed(i, exc, reference if by_digest else None)
        raise AssertionError("the origin is always tried")

    async def fetch_range(self, digest: str, start: int, end: int, *, piece: int | None = None,
                          deliver=None, pace=None):
        if deliver is None:
            out: list = []
            await self.fetch_range(digest, start, end, piece=end - start, deliver=lambda _o, d: out.append(d))
            return out[0]
        pos = start
        name = ""

        def track(off: int, data) -> None:
            nonlocal pos
            deliver(off, data)
            pos = off + len(data)
            self.served[name] += len(data)

        for i in self._order(True, digest):
            name = self.endpoints[i].name
            try:
                await self._client(i).fetch_range(digest, pos, end, piece=piece, deliver=track, pace=pace)
                return None
            except (NetworkError, RegistryError, AuthError) as exc:
                if self.endpoints[i].origin:
                    raise
                self._failed(i, exc, digest)
        raise AssertionError("the origin is always tried")

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for c in list(self._clients.values()):
                await c.aclose()

    # -- internals --------------------------------------------------------------------------
    def _order(self, by_digest: bool, digest: str | None) -> list[int]:
        now = trio.current_time()
        last = len(self.endpoints) - 1
        if digest is not None and digest in self._distrusted:
            return [last]
        out = [i for i, e in enumerate(self.endpoints[:-1])
               if e.allows(by_digest) and self._down.get(i, 0.0) <= now and (i, digest) not in self._missing]
        return out + [last]

    def _failed(self, i: int, exc: BaseException, digest: str | None) -> None:
        e = self.endpoints[i]
        if getattr(exc, "http_status", None) == 404:   # it lacks this one (a partial mirror): not down
            if digest is not None:
                self._missing.add((i, digest))
            log.info("mirror %s has no %s: the next host is asked", e.name, digest or "such tag")
            return
        twin = self.endpoints[i + 1] if i + 1 < len(self.endpoints) else None
        if e.scheme == "https" and twin is not None and twin.scheme == "http" and \
                (twin.host, twin.repository) == (e.host, e.repository):
            # an insecure mirror (registries.conf): TLS first, as containers/image tries it; a
            # plain-HTTP server fails that at once, and its http:// twin serves from now on
            log.info("mirror %s does not speak TLS (%s): plain HTTP from now on", e.name, exc)
            self._down[i] = math.inf
            return
        if self._down.get(i, 0.0) <= trio.current_time():
            log.warning("mirror %s failed (%s): the next host serves for %.0f s", e.name, exc, DOWN_FOR)
        self._down[i] = trio.current_time() + DOWN_FOR

    def _client(self, i: int) -> RegistryClient:
        c = self._clients.get(i)
        if c is not None:
            return c
        e = self.endpoints[i]
        ref, options, env = self.ref, self.options, self.env
        if e.origin and e == default_origin(ref, insecure=options.insecure):
            c = RegistryClient(ref, options, env=env)   # no configuration touches it: as always
        else:
            view = Reference(e.host, e.repository, ref.tag, ref.digest)
            options = dataclasses.replace(options, insecure=e.scheme == "http")
            if not e.origin:   # the origin's secrets stay with the origin; a mirror fails fast
                options = dataclasses.replace(options, username=None, password=None, password_file=None,
                                              retries=min(options.retries, MIRROR_RETRIES),
                                              retry_time=min(options.retry_time, MIRROR_RETRY_TIME))
                env = {k: v for k, v in self._environ.items() if k not in _ORIGIN_SECRETS}
            c = RegistryClient(view, options, env=env, endpoint=e)
        self._clients[i] = c
        return c
