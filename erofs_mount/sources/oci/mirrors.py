"""Registry mirrors (PURE: no I/O): which hosts may serve a reference, in which order.

Two configuration formats say it, both read as their own tools read them:

* containers' ``registries.conf`` (containers-registries.conf(5), v2 format, and the drop-ins of
  containers-registries.conf.d(5)): ``[[registry]]`` tables chosen by the longest matching
  ``prefix`` (``host[:port][/namespace…]``, or ``*.domain``), whose ``location`` rewrites the
  prefix; their ``[[registry.mirror]]`` tables (``location``, ``insecure``, ``pull-from-mirror`` =
  ``all`` | ``digest-only`` | ``tag-only``) are tried in order, the primary location last;
  ``mirror-by-digest-only = true`` keeps every mirror to digest pulls; ``blocked = true`` refuses
  the pull.  A drop-in's ``[[registry]]`` replaces an earlier one with the same prefix.
* containerd's ``hosts.toml`` (containerd docs/hosts.md, core/remotes/docker/config/hosts.go), one
  per registry host in ``<dir>/<host>/hosts.toml`` (with a port: ``<host>_<port>_``, then
  ``<host>:<port>``; then ``_default``): the ``[host."URL"]`` tables in file order, then ``server``
  (default: the registry itself); ``capabilities`` (``pull``: blobs and manifests by digest,
  ``resolve``: tags; default all), ``skip_verify``, ``ca``, ``override_path`` (the URL's path is
  the API root; otherwise ``/v2`` is appended to it), ``[header]``.  A mirror gets the query
  parameter ``ns=<registry>`` as containerd sends it.

The result is a list of ``Endpoint`` (mirrors first, the origin last).  Whatever serves a blob,
its bytes are checked as before (the blob digest in the persistent cache, dm-verity per block);
a tag is resolved only by endpoints allowed to (``resolve``), because a digest reached through
an untrusted mirror's tag would not be the user's image.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ...errors import UsageError
from .reference import DOCKER_HUB, DOCKER_HUB_API, Reference

PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")


@dataclass(frozen=True)
class Endpoint:
    """One host that may serve a reference: where its API is and what it may be asked."""

    scheme: str                 # "https" or "http"
    host: str                   # host[:port]
    repository: str             # the repository there (registries.conf ``location`` rewrites it)
    api_root: str = "/v2"       # the path before ``/<repository>/blobs/…``
    origin: bool = False        # the reference's own registry (or its rewritten location): tried last
    pull: bool = True           # blobs, manifests by digest
    resolve: bool = True        # manifests by tag
    skip_verify: bool = False   # TLS certificate not checked
    cafiles: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    ns: str | None = None       # containerd's ``?ns=`` query parameter
    source: str = ""            # the configuration file that named it ("" for the origin by default)

    @property
    def name(self) -> str:
        """How logs and ``status`` name it: host[:port], with a non-standard API root."""
        return self.host + self.api_root.removesuffix("/v2")

    def allows(self, by_digest: bool) -> bool:
        return self.pull if by_digest else self.resolve


# ------------------------------------------------------------------------------ registries.conf
@dataclass
class RegistryTable:
    """One ``[[registry]]`` table."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: list[dict] = field(default_factory=list)   # {"location", "insecure", "pull-from-mirror"}
    source: str = ""


def _get(table: dict, key: str, where: str, kind: type):
    """``table[key]`` of type *kind* (bool: false, str: "" when absent); UsageError otherwise."""
    v = table.get(key, kind())
    if not isinstance(v, kind):
        raise UsageError(f"{where}: {key} must be {'true or false' if kind is bool else 'a string'}, not {v!r}")
    return v.strip() if kind is str else v


def _bool(table: dict, key: str, where: str) -> bool:
    return _get(table, key, where, bool)


def _str(table: dict, key: str, where: str) -> str:
    return _get(table, key, where, str)


def _check_prefix(prefix: str, where: str) -> None:
    if prefix.startswith("*."):
        if "/" in prefix or ":" in prefix or "*" in prefix[2:]:
            raise UsageError(f"{where}: prefix {prefix!r}: a wildcard prefix is only *.domain")
    elif "*" in prefix or prefix.startswith(("http://", "https://")) or not prefix:
        raise UsageError(f"{where}: prefix/location {prefix!r} is not host[:port][/namespace…]")


def parse_registries_conf(text: str, path: str) -> list[RegistryTable]:
    """The ``[[registry]]`` tables of one file (v2 format); UsageError naming the file otherwise."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    if "registries" in doc and isinstance(doc["registries"], dict):
        return []   # the v1 format ([registries.search] …) names no mirrors
    tables = doc.get("registry", [])
    if not isinstance(tables, list):
        raise UsageError(f"{path}: [[registry]] must be an array of tables")
    out = []
    for n, t in enumerate(tables):
        where = f"{path}: [[registry]] #{n + 1}"
        if not isinstance(t, dict):
            raise UsageError(f"{where}: not a table")
        location = _str(t, "location", where)
        prefix = _str(t, "prefix", where) or location
        _check_prefix(prefix, where)
        if location:
            _check_prefix(location, where)
        elif not prefix.startswith("*."):
            raise UsageError(f"{where}: no location")
        mirrors = t.get("mirror", [])
        if not isinstance(mirrors, list):
            raise UsageError(f"{where}: mirror must be an array of tables")
        by_digest = _bool(t, "mirror-by-digest-only", where)
        checked = []
        for k, m in enumerate(mirrors):
            mwhere = f"{where} mirror #{k + 1}"
            if not isinstance(m, dict):
                raise UsageError(f"{mwhere}: not a table")
            loc = _str(m, "location", mwhere)
            _check_prefix(loc, mwhere)
            pull = _str(m, "pull-from-mirror", mwhere) or "all"
            if pull not in PULL_FROM_MIRROR:
                raise UsageError(f"{mwhere}: pull-from-mirror={pull!r}: all, digest-only or tag-only")
            if by_digest and m.get("pull-from-mirror"):
                raise UsageError(f"{mwhere}: pull-from-mirror cannot be combined with mirror-by-digest-only")
            checked.append({"location": loc, "insecure": _bool(m, "insecure", mwhere), "pull-from-mirror": pull})
        out.append(RegistryTable(prefix, location, _bool(t, "insecure", where), _bool(t, "blocked", where),
                                 by_digest, checked, path))
    return out


def merge_tables(files: list[list[RegistryTable]]) -> list[RegistryTable]:
    """The tables of the main file and its drop-ins in loading order: a later table replaces an
    earlier one with the same prefix (containers-registries.conf.d(5))."""
    by_prefix: dict[str, RegistryTable] = {}
    for tables in files:
        for t in tables:
            by_prefix.pop(t.prefix, None)
            by_prefix[t.prefix] = t
    return list(by_prefix.values())


def _name_of(ref: Reference) -> str:
    return f"{ref.registry}/{ref.repository}"


def matched_length(prefix: str, name: str) -> int:
    """How much of *name* (``host[:port]/repository``, no tag) *prefix* matches, or -1
    (containers/image sysregistriesv2 ``refMatchingPrefix``: a prefix ends at a ``/`` or the end —
    not at a port's ``:``, which containers/image lets ``example.com`` match and warns not to rely
    on; ``*.domain`` matches any subdomain of the host, with or without a port)."""
    if prefix.startswith("*."):
        at = name.find(prefix[1:])
        if at < 0 or "/" in name[:at]:
            return -1
        end = at + len(prefix) - 1
        return end if end == len(name) or name[end] in "/:" else -1
    if name.startswith(prefix):
        end = len(prefix)
        return end if end == len(name) or name[end] == "/" else -1
    return -1


def choose_table(tables: list[RegistryTable], ref: Reference) -> RegistryTable | None:
    """The table with the longest matching prefix."""
    name = _name_of(ref)
    best = None
    for t in tables:
        if matched_length(t.prefix, name) >= 0 and (best is None or len(t.prefix) > len(best.prefix)):
            best = t
    return best


def _rewrite(prefix: str, location: str, name: str) -> tuple[str, str]:
    """(host, repository) of *name* with what *prefix* matched replaced by *location* (an empty
    location, for a wildcard prefix: unchanged)."""
    target = location + name[matched_length(prefix, name):] if location else name
    host, _, repo = target.partition("/")
    if not repo:
        raise UsageError(f"registries.conf: {prefix!r} -> {location!r} leaves no repository for {name}")
    return host, repo


def registries_endpoints(tables: list[RegistryTable], ref: Reference, *, origin_insecure: bool
                         ) -> tuple[list[Endpoint], Endpoint | None]:
    """(the mirrors for *ref* in order, the rewritten origin or None when not rewritten).
    UsageError when the matching table blocks the reference."""
    t = choose_table(tables, ref)
    if t is None:
        return [], None
    if t.blocked:
        raise UsageError(f"{ref}: pulls of {t.prefix} are blocked by {t.source}")
    name = _name_of(ref)
    mirrors = []
    for m in t.mirrors:
        host, repo = _rewrite(t.prefix, m["location"], name)
        mode = "digest-only" if t.mirror_by_digest_only else m["pull-from-mirror"]
        pull = mode in ("all", "digest-only")
        resolve = mode in ("all", "tag-only")
        schemes = ("https", "http") if m["insecure"] else ("https",)
        for scheme in schemes:   # insecure: TLS unchecked, then plain HTTP (as containers/image tries them)
            mirrors.append(Endpoint(scheme, _api_host(host), repo, pull=pull, resolve=resolve,
                                    skip_verify=m["insecure"], source=t.source))
    origin = None
    if t.location and not t.prefix.startswith("*."):
        host, repo = _rewrite(t.prefix, t.location, name)
        if (host, repo) != (ref.registry, ref.repository):
            scheme = "http" if origin_insecure or t.insecure else "https"
            origin = Endpoint(scheme, _api_host(host), repo, origin=True, skip_verify=t.insecure, source=t.source)
    return mirrors, origin


def _api_host(host: str) -> str:
    return DOCKER_HUB_API if host in (DOCKER_HUB, "index.docker.io") else host


# ------------------------------------------------------------------------------ hosts.toml
def hosts_dir_names(registry: str) -> list[str]:
    """The directories under the hosts dir that may configure *registry*, in the order containerd
    looks (docs/hosts.md "Port Handling in Registry Host")."""
    names = []
    host, sep, port = registry.rpartition(":")
    if sep and port.isdigit() and host:
        names.append(f"{host}_{port}_")
    names += [registry, "_default"]
    return names


def parse_hosts_toml(text: str, path: str, base_dir: str, ref: Reference) -> tuple[list[Endpoint], Endpoint | None]:
    """(the ``[host."…"]`` endpoints in file order, the ``server`` endpoint or None when not set)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise UsageError(f"{path}: host must be a table of [host.\"URL\"] tables")
    out = []
    for url, conf in hosts.items():
        if not isinstance(conf, dict):
            raise UsageError(f"{path}: [host.{url!r}] is not a table")
        out.append(_hosts_endpoint(url, conf, f"{path} [host.{url!r}]", base_dir, ref, mirror=True))
    server = doc.get("server")
    origin = None
    if server is not None:
        if not isinstance(server, str) or not server.strip():
            raise UsageError(f"{path}: server must be a URL")
        origin = _hosts_endpoint(server.strip(), doc, f"{path} server", base_dir, ref, mirror=False)
    return out, origin


def _hosts_endpoint(url: str, conf: dict, where: str, base_dir: str, ref: Reference, *, mirror: bool) -> Endpoint:
    if not url.startswith(("http://", "https://")):
        url = "https://" + url
    u = urlsplit(url)
    if not u.netloc:
        raise UsageError(f"{where}: {url!r} names no host")
    path = "/" + u.path.strip("/") if u.path.strip("/") else ""
    override = _bool(conf, "override_path", where)
    if not override and not path.endswith("/v2"):
        path += "/v2"
    caps = conf.get("capabilities")
    if caps is None:
        caps = ["pull", "resolve", "push"]
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise UsageError(f"{where}: capabilities must be a list of strings")
    caps = [c.lower() for c in caps]
    unknown = [c for c in caps if c not in ("pull", "resolve", "push", "referrers")]
    if unknown:
        raise UsageError(f"{where}: unknown capability {unknown[0]!r}")
    ca = conf.get("ca")
    cas = [ca] if isinstance(ca, str) else (ca or [])
    if not isinstance(cas, list) or not all(isinstance(c, str) for c in cas):
        raise UsageError(f"{where}: ca must be a path or a list of paths")
    cas = [c if c.startswith("/") else f"{base_dir}/{c}" for c in cas]
    header = conf.get("header", {})
    if not isinstance(header, dict):
        raise UsageError(f"{where}: header must be a table")
    headers = []
    for k, v in header.items():
        for one in (v if isinstance(v, list) else [v]):
            if not isinstance(one, str):
                raise UsageError(f"{where}: header {k} must be a string or a list of strings")
            headers.append((k, one))
    host = _api_host(u.netloc)
    return Endpoint(u.scheme, host, ref.repository, api_root=path, origin=not mirror,
                    pull="pull" in caps, resolve="resolve" in caps, skip_verify=_bool(conf, "skip_verify", where),
                    cafiles=tuple(cas), headers=tuple(headers), ns=ref.registry if mirror else None, source=where)


# ------------------------------------------------------------------------------ together
def default_origin(ref: Reference, *, insecure: bool) -> Endpoint:
    return Endpoint("http" if insecure else "https", ref.api_host, ref.repository, origin=True)


def plan(ref: Reference, *, insecure: bool, tables: list[RegistryTable] | None = None,
         hosts: tuple[list[Endpoint], Endpoint | None] | None = None) -> list[Endpoint]:
    """Every endpoint for *ref* in the order to try: registries.conf mirrors, hosts.toml hosts,
    then the origin (registries.conf's ``location``, else hosts.toml's ``server``, else the
    reference's registry).  Duplicates (the same scheme, host, API root and repository) are kept
    once, at their first place, except that the origin always stays last."""
    mirrors, origin = registries_endpoints(tables or [], ref, origin_insecure=insecure)
    if hosts is not None:
        mirrors = mirrors + hosts[0]
        if origin is None and hosts[1] is not None:
            origin = hosts[1]
    if origin is None:
        origin = default_origin(ref, insecure=insecure)
    key = (origin.scheme, origin.host, origin.api_root, origin.repository)
    seen, out = {key}, []
    for e in mirrors:
        k = (e.scheme, e.host, e.api_root, e.repository)
        if k not in seen:
            seen.add(k)
            out.append(e)
    return out + [origin]
