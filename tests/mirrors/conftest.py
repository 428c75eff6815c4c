"""Registry mirrors against real docker-registry processes on 127.0.0.1:

* the origin: Basic auth (alice, given on the command line), its access log counting blob bytes;
* a plain mirror: the same images pushed, Basic auth for ANOTHER user (bob, from a Docker
  config.json that names only the mirror host): a mirror sent the origin's credentials refuses them,
  and the origin would then serve the bytes — the tests count them;
* a damaged mirror: the same images, one byte flipped in a blob as it stores it;
* a pull-through cache (docker-registry ``proxy:``) of the origin's storage served anonymously
  (``origin_anon``: distribution 2.8's proxy does not log in to a Basic-auth upstream).

Images: corpus images with a dm-verity tree appended (verity-format), pushed with the root-hash
annotation, and a tar+gzip layer of the corpus tree; refs are pinned by digest (annotations trusted).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from erofs_mount.verity.format import ANNOTATION_ROOT
from tests import corpuslib
from tests.oci._servers import REGISTRY_BIN, Pusher, Registry, blob_bytes, docker_auth, sha256, start_registry, \
    write_htpasswd
from tests.verity.conftest import Formatted, file_offset, format_copy

MT = "application/vnd.erofs"
TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"
NAMES = ("plain-inline-4k", "lz4")
ALICE, BOB = ("alice", "wonderland"), ("bob", "builder")


@dataclass
class MirrorWorld:
    root: Path
    origin: Registry
    mirror: Registry
    bad: Registry
    pullthrough: Registry
    origin_anon: Registry         # the origin's storage without auth (the pull-through's upstream)
    stores: dict                  # name -> storage dir of each registry above
    images: dict = field(default_factory=dict)    # name -> Formatted (digest, manifest)
    tgz: tuple = ()               # (layer bytes, layer digest, manifest digest) of the tar+gzip image
    damaged: tuple = ()           # (path in the image, image offset) of the byte flipped on the bad mirror

    def ref(self, name: str, host: str | None = None) -> str:
        return f"{host or self.origin.host}/team/{name}@{self.images[name].manifest}"

    def tgz_ref(self) -> str:
        return f"{self.origin.host}/team/tgz@{self.tgz[2]}"

    def origin_blob_bytes(self) -> int:
        return blob_bytes(self.origin)

    def conf(self, path: Path, *mirrors: str) -> Path:
        """A registries.conf naming *mirrors* (host:port, plain HTTP) for the origin, in order."""
        text = f'[[registry]]\nlocation = "{self.origin.host}"\n'
        for m in mirrors:
            text += f'[[registry.mirror]]\nlocation = "{m}"\ninsecure = true\n'
        path.write_text(text)
        return path

    def env(self, tmp: Path, conf: Path | None = None, **extra) -> dict:
        """The daemon's environment: the mirror's credentials (bob) in a Docker config for the
        mirror host only; no other credential source."""
        cfg = tmp / "docker"
        cfg.mkdir(exist_ok=True)
        (cfg / "config.json").write_text(json.dumps({"auths": {self.mirror.host: docker_auth(*BOB)}}))
        env = {k: v for k, v in os.environ.items()
               if k not in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "EROFS_MOUNT_USERNAME",
                            "EROFS_MOUNT_PASSWORD", "CONTAINERS_REGISTRIES_CONF", "EROFS_MOUNT_HOSTS_DIR")}
        env.update(HOME=str(tmp), DOCKER_CONFIG=str(cfg), EROFS_MOUNT_HOSTS_DIR=str(tmp / "no-hosts-dir"))
        if conf is not None:
            env["CONTAINERS_REGISTRIES_CONF"] = str(conf)
        env.update(extra)
        return env

    def origin_opts(self, tmp: Path) -> str:
        pw = tmp / "alice.pw"
        pw.write_text(ALICE[1])
        return f"oci.insecure,oci.username={ALICE[0]},oci.password_file={pw}"


def blob_file(storage: Path, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


def _tgz_layer() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(corpuslib.source_files())[:200]:
            data = corpuslib.source_bytes(path, 0, 1 << 30)
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(out.getvalue(), mtime=0)


@pytest.fixture(scope="session")
def mworld(tmp_path_factory) -> MirrorWorld:
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    root = tmp_path_factory.mktemp("mirrors")
    stores = {n: root / f"{n}-storage" for n in ("origin", "mirror", "bad", "pullthrough")}
    started: list[Registry] = []

    def start(name: str, store: str, **kw) -> Registry:
        reg = start_registry(root / name, stores[store], **kw)
        started.append(reg)
        return reg

    try:
        htp = {"origin": write_htpasswd(root / "origin.htpasswd", dict([ALICE])),
               "mirror": write_htpasswd(root / "mirror.htpasswd", dict([BOB]))}
        origin = start("origin", "origin", access_log=True,
                       auth={"htpasswd": {"realm": "origin", "path": str(htp["origin"])}})
        mirror = start("mirror", "mirror", access_log=True,
                       auth={"htpasswd": {"realm": "mirror", "path": str(htp["mirror"])}})
        bad = start("bad", "bad", access_log=True)
        origin_anon = start("origin-anon", "origin", access_log=True)
        pushers = {"origin": Pusher(origin_anon.url), "mirror": Pusher(start("mirror-push", "mirror").url),
                   "bad": Pusher(start("bad-push", "bad").url)}
        pullthrough = start("pullthrough", "pullthrough", access_log=True, proxy={"remoteurl": origin_anon.url})
        w = MirrorWorld(root, origin, mirror, bad, pullthrough, origin_anon, stores)
        for name in NAMES:
            f: Formatted = format_copy(name, root)
            f.digest = sha256(f.raw)
            for p in pushers.values():
                f.manifest, _ = p.image(f"team/{name}", "v1", [(MT, f.raw, {ANNOTATION_ROOT: f.root})])
            w.images[name] = f
        layer = _tgz_layer()
        for p in pushers.values():
            manifest, _ = p.image("team/tgz", "v1", [(TGZ, layer)])
        w.tgz = (layer, sha256(layer), manifest)
        # the damaged mirror: one byte of a file's data flipped in plain-inline-4k's blob, and one of
        # the tar+gzip layer (its gzip stream then fails its CRC or the digest)
        f = w.images["plain-inline-4k"]
        path, at = file_offset(f.raw, corpuslib.load_manifest(corpuslib.image("plain-inline-4k").manifest))
        stored = blob_file(stores["bad"], f.digest)
        data = bytearray(stored.read_bytes())
        data[at] ^= 0x10
        stored.write_bytes(bytes(data))
        w.damaged = (path, at)
        stored = blob_file(stores["bad"], w.tgz[1])
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0x10
        stored.write_bytes(bytes(data))
        for p in pushers.values():
            p.close()
        yield w
    finally:
        for reg in started:
            reg.stop()
