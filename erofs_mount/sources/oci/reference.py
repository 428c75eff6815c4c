"""Image references by the Docker rules (PURE: no I/O).

The grammar is the one of distribution's ``reference`` package
(``reference/normalize.go`` ``splitDockerDomain`` and ``reference/regexp.go``),
re-implemented here from its rules:

- ``name[:tag][@digest]``; a first path component containing ``.`` or ``:``,
  or equal to ``localhost``, or holding an upper-case letter, is a registry;
  otherwise the registry is Docker Hub (``docker.io``).
- ``index.docker.io`` is an alias of ``docker.io``; single-component Docker Hub
  names live under ``library/``.
- with no tag and no digest the tag is ``latest``; with a digest the digest is
  what gets resolved (a tag next to it is informational).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

# reference/regexp.go: path components are lower-case alphanumerics joined by
# one of the separators ``.``, ``_``, ``__`` or any number of ``-``.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[\w][\w.-]{0,127}\Z")
_DOMAIN = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?\Z"
)
_DIGEST_HEX = {"sha256": 64, "sha384": 96, "sha512": 128}
_NAME_MAX = 255


def parse_digest(text: str) -> str:
    """Validate ``algorithm:hex`` and return it; UsageError otherwise."""
    algo, sep, hexpart = text.partition(":")
    want = _DIGEST_HEX.get(algo)
    if not sep or want is None:
        raise UsageError(f"invalid digest {text!r}: expected sha256:<64 hex digits>")
    if len(hexpart) != want or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise UsageError(f"invalid digest {text!r}: expected {algo}:<{want} lower-case hex digits>")
    return text


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed, normalised image reference."""

    registry: str  # e.g. "docker.io", "localhost:5000", "127.0.0.1:40123"
    repository: str  # e.g. "library/nginx", "team/app"
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """host[:port] the registry API is served on."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def is_docker_hub(self) -> bool:
        return self.registry == DOCKER_HUB

    @property
    def reference(self) -> str:
        """What to put after ``/manifests/``: the digest if any, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: str) -> "Reference":
        """The same name pinned to *digest* (the tag is kept for display)."""
        return Reference(self.registry, self.repository, self.tag, parse_digest(digest))

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def config_keys(self) -> list[str]:
        """Keys under which credential stores may file this registry, best first."""
        if self.is_docker_hub:
            return [DOCKER_HUB_CONFIG_KEY, "docker.io", "index.docker.io", "registry-1.docker.io"]
        return [self.registry]


def split_domain(name: str) -> tuple[str, str]:
    """(registry, remainder) by reference/normalize.go splitDockerDomain."""
    first, slash, rest = name.partition("/")
    if not slash or (
        not any(c in first for c in ".:") and first != "localhost" and first.lower() == first
    ):
        registry, remainder = DOCKER_HUB, name
    else:
        registry, remainder = first, rest
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in remainder:
        remainder = f"library/{remainder}"
    return registry, remainder


def parse_reference(text: str) -> Reference:
    """Parse *text* by the Docker rules; UsageError naming the problem."""
    if not text or text != text.strip():
        raise UsageError(f"invalid image reference {text!r}")
    if "://" in text:
        raise UsageError(f"invalid image reference {text!r}: no scheme allowed (use oci.insecure for HTTP)")
    name, at, digest = text.partition("@")
    if at:
        digest = parse_digest(digest)
    else:
        digest = None
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.match(tag):
            raise UsageError(f"invalid tag {tag!r} in image reference {text!r}")
    if not name:
        raise UsageError(f"invalid image reference {text!r}: empty name")
    registry, repository = split_domain(name)
    if not _DOMAIN.match(registry):
        raise UsageError(f"invalid registry {registry!r} in image reference {text!r}")
    for comp in repository.split("/"):
        if not _COMPONENT.match(comp):
            raise UsageError(
                f"invalid repository name {repository!r} in image reference {text!r}"
                " (lower-case letters, digits and . _ - only)"
            )
    if len(f"{registry}/{repository}") > _NAME_MAX:
        raise UsageError(f"image reference {text!r} is longer than {_NAME_MAX} characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest)
