"""Session fixtures: a REAL docker-registry (CNCF distribution 2.8.2) seeded once, plus auth/TLS/redirect
variants over the same storage.  Skipped with a reason when docker-registry is not installed."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import corpuslib
from tests.oci._servers import (
    REGISTRY_BIN, USERS, BlobHost, Pusher, Registry, TokenIssuer, make_tls, sha256, start_registry, write_htpasswd,
)

EROFS_MAGIC = (0xE0F5E1E2).to_bytes(4, "little")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/oci/" in str(item.fspath) and REGISTRY_BIN is None:
            item.add_marker(pytest.mark.skip(reason="docker-registry is not installed (apt-get install docker-registry)"))


def fake_erofs(size: int, seed: int) -> bytes:
    data = bytearray(random.Random(seed).randbytes(size))
    data[1024:1028] = EROFS_MAGIC
    return bytes(data)


@dataclass
class World:
    root: Path
    storage: Path
    registry: Registry  # anonymous, plain HTTP
    blobs: dict = field(default_factory=dict)  # name -> bytes
    digests: dict = field(default_factory=dict)  # name -> digest
    manifests: dict = field(default_factory=dict)  # repo:tag -> manifest digest
    corpus: dict = field(default_factory=dict)  # image name -> corpuslib.CorpusImage (layer 0, devices 1..)
    pusher: Pusher | None = None

    def ref(self, repo: str, reg: Registry | None = None) -> str:
        return f"{(reg or self.registry).host}/{repo}"


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    root = tmp_path_factory.mktemp("oci")
    storage = root / "storage"
    reg = start_registry(root / "anon", storage)
    w = World(root, storage, reg)
    p = w.pusher = Pusher(reg.url)
    img = lambda n: corpuslib.image(n.removesuffix(".erofs")).path.read_bytes()  # noqa: E731
    w.blobs = {
        "A": img("plain-inline-4k.erofs"), "B": img("lz4.erofs"), "Z": img("zstd.erofs"), "D": img("deflate.erofs"),
        "junk": random.Random(7).randbytes(300_000), "notmagic": random.Random(8).randbytes(8192),
        "big": fake_erofs(8 << 20, 9), "small": fake_erofs(5000, 10),
    }
    w.digests = {k: sha256(v) for k, v in w.blobs.items()}
    B = w.blobs
    w.manifests["team/app:v1"], _ = p.image("team/app", "v1", [
        ("application/vnd.erofs", B["A"]), ("application/vnd.oci.image.layer.v1.tar+gzip", B["junk"]),
        ("application/vnd.erofs.layer.v1", B["B"])])
    w.manifests["team/notmagic:v1"], _ = p.image("team/notmagic", "v1", [("application/vnd.erofs", B["notmagic"])])
    w.manifests["team/zstd:v1"], _ = p.image("team/zstd", "v1", [("application/vnd.erofs.layer.v1+zstd", B["Z"])])
    w.manifests["team/big:v1"], _ = p.image("team/big", "v1", [("application/vnd.erofs", B["big"])])
    w.manifests["team/small:v1"], _ = p.image("team/small", "v1", [("application/vnd.erofs", B["small"])])
    w.manifests["team/moving:v1"], _ = p.image("team/moving", "v1", [("application/vnd.erofs", B["A"])])
    # an OCI index with two platforms (+ an amd64 entry marked os.features=erofs) and a Docker list
    entries = []
    for plat, blob in (({"os": "linux", "architecture": "amd64"}, "B"),
                       ({"os": "linux", "architecture": "arm64", "variant": "v8"}, "Z"),
                       ({"os": "linux", "architecture": "amd64", "os.features": ["erofs"]}, "D")):
        d, n = p.image("team/multi", f"{plat['architecture']}-{blob}", [("application/vnd.erofs", B[blob])])
        entries.append((plat, d, n))
    w.manifests["team/multi:v1"], _ = p.index("team/multi", "v1", entries)
    dentries = []
    for plat, blob in (({"os": "linux", "architecture": "amd64"}, "B"), ({"os": "linux", "architecture": "arm64"}, "Z")):
        d, n = p.image("team/dlist", f"{plat['architecture']}", [("application/vnd.erofs", B[blob])], docker=True)
        dentries.append((plat, d, n))
    w.manifests["team/dlist:v1"], _ = p.index("team/dlist", "v1", dentries, docker=True)
    for name in corpuslib.names():  # every image, extra devices as further layers
        ci = corpuslib.image(name)
        p.image(f"corpus/{name}", "v1", [("application/vnd.erofs", f.read_bytes()) for f in (ci.path, *ci.devices)])
        w.corpus[name] = ci
    yield w
    p.close()
    reg.stop()


@pytest.fixture(scope="session")
def basic_registry(world) -> Registry:
    hp = write_htpasswd(world.root / "htpasswd", USERS)
    reg = start_registry(world.root / "basic", world.storage, auth={"htpasswd": {"realm": "test", "path": str(hp)}})
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def tls_registry(world):
    cert, key, ca = make_tls(world.root / "tls")
    reg = start_registry(world.root / "tlsreg", world.storage, tls=(cert, key, ca))
    yield reg, ca
    reg.stop()


def _token_registry(world, name: str, **issuer_kw):
    issuer = TokenIssuer(world.root / f"issuer-{name}", **issuer_kw).start()
    reg = start_registry(world.root / f"token-{name}", world.storage, auth=issuer.registry_auth())
    return reg, issuer


@pytest.fixture(scope="session")
def token_anon(world):
    reg, issuer = _token_registry(world, "anon", anonymous=True)
    yield reg, issuer
    reg.stop()
    issuer.stop()


@pytest.fixture(scope="session")
def token_users(world):
    reg, issuer = _token_registry(world, "users", anonymous=False, users={"bob": "builder"})
    yield reg, issuer
    reg.stop()
    issuer.stop()


@pytest.fixture
def token_factory(world):
    """Start a token registry with custom issuer settings (stopped after the test)."""
    started = []

    def make(name: str, **kw):
        reg, issuer = _token_registry(world, name, **kw)
        started.append((reg, issuer))
        return reg, issuer

    yield make
    for reg, issuer in started:
        reg.stop()
        issuer.stop()


@pytest.fixture(scope="session")
def redirect_registry(world):
    """Basic-auth registry whose blob GETs answer 307 to another origin (a BlobHost on localhost)."""
    host = BlobHost(world.storage)
    hp = write_htpasswd(world.root / "htpasswd-redirect", USERS)
    reg = start_registry(world.root / "redirect", world.storage,
                         auth={"htpasswd": {"realm": "test", "path": str(hp)}},
                         middleware={"storage": [{"name": "redirect", "options": {"baseurl": host.baseurl}}]})
    yield reg, host
    reg.stop()
    host.stop()
