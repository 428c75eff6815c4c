"""Issue 7, NBD side, end to end inside user-mode Linux: a docker-registry started IN the guest on
127.0.0.1 with Bearer-token auth (a token issuer that refuses anonymous pulls), the image pushed as a
two-platform OCI index, mounted through the real CLI (`erofs-mount --mode nbd -o oci.layer=0,...`).

- credentials only in a docker config.json: the record holds no secret; persistent blob cache
  reused by the reattached daemon (bytes fetched measured before/after); status fields;
- credentials only on the command line: b64 in the record (0600 in a 0700 directory); the registry
  is down during the reattach window (bounded retries, reads resume, no wrong byte);
- an erofs-utils OCI_LAYER record written by hand is reattached, with a warning when the tag moved.

Every scenario: readers hash files in a loop while the daemon is SIGKILLed and the tag is moved to
another image; after --reattach they finish with zero errors and the tree is still the ORIGINAL image.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from erofs_mount.backends.nbd import lifecycle, state, sysfs
from erofs_mount.backends.nbd.recovery import NBD_RUN_DIR, parse_record
from tests import corpuslib

from .helpers import Readers, daemon_pid, drop_caches, kill_daemon, nothing_left, wait_for_blocked_reader, wait_until

try:
    from tests.oci._servers import (REGISTRY_BIN, USERS, Pusher, Registry, TokenIssuer, docker_auth, env_with,
                                    make_tls, sha256, start_registry, write_json)
except ImportError:  # pragma: no cover
    REGISTRY_BIN = None

REPO = str(Path(__file__).resolve().parents[2])
USER, PASSWORD = next(iter(USERS.items()))
ORIGINAL, MOVED_TO = "plain-inline-4k", "lz4"  # uncompressed and lz4: both mount on 6.1
REPO_NAME = "e2e/app"
MANIFEST_JSON = "application/vnd.oci.image.manifest.v1+json"


class Env:
    """The guest's registries: `served` (token auth, what erofs-mount talks to) and `push` (anonymous,
    same storage: the test's own writes, since the issuer grants only pull)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.issuer = TokenIssuer(root / "issuer", users=dict(USERS), anonymous=False).start()
        self.push = start_registry(root / "push", root / "storage")
        self.served = start_registry(root / "served", root / "storage", auth=self.issuer.registry_auth())
        self.pusher = Pusher(self.push.url)
        self.images = {n: corpuslib.image(n) for n in (ORIGINAL, MOVED_TO)}
        self.blobs = {n: img.path.read_bytes() for n, img in self.images.items()}

    @property
    def host(self) -> str:
        return self.served.host

    def tag(self, tag: str, amd64: bytes, arm64: bytes) -> str:
        """Point REPO_NAME:tag at a two-platform index (linux/amd64, linux/arm64/v8); its digest."""
        entries = []
        for plat, blob in (({"os": "linux", "architecture": "amd64"}, amd64),
                           ({"os": "linux", "architecture": "arm64", "variant": "v8"}, arm64)):
            d, n = self.pusher.image(REPO_NAME, f"{tag}-{plat['architecture']}", [("application/vnd.erofs", blob)],
                                     config={"architecture": plat["architecture"], "os": "linux"})
            entries.append((plat, d, n))
        return self.pusher.index(REPO_NAME, tag, entries)[0]

    def tls_served(self) -> tuple[str, Path]:
        """A TLS variant of the token registry over the same storage (host, CA file), started once."""
        if not hasattr(self, "_tls"):
            cert, key, ca = make_tls(self.root / "tls")
            reg = start_registry(self.root / "served-tls", self.root / "storage", auth=self.issuer.registry_auth(),
                                 tls=(cert, key, ca))
            self._tls = (reg, ca)
        return self._tls[0].host, self._tls[1]

    def stop_served(self) -> None:
        self.served.stop()

    def restart_served(self) -> None:
        """The token registry again, on the same port (the record names host:port)."""
        cfg = json.loads((self.served.workdir / "config.json").read_text())
        cfg["http"]["addr"] = self.host
        path = self.served.workdir / "config-again.json"
        path.write_text(json.dumps(cfg))
        with open(self.served.workdir / "registry-again.log", "wb") as log:
            proc = subprocess.Popen(["setpriv", "--pdeathsig", "TERM", REGISTRY_BIN, "serve", str(path)],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.served = Registry(proc, self.served.port, self.served.workdir)
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=5) as c:
            while time.monotonic() < deadline:
                try:
                    if c.get(f"{self.served.url}/v2/").status_code == 401:
                        return
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, "the restarted registry exited"
                time.sleep(0.05)
        raise AssertionError("the registry did not come back")

    def close(self) -> None:
        self.pusher.close()
        for reg in (self.served, self.push, *([self._tls[0]] if hasattr(self, "_tls") else [])):
            reg.stop()
        self.issuer.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    e = Env(tmp_path_factory.mktemp("e2e-registry"))
    try:
        yield e
    finally:
        e.close()


# ------------------------------------------------------------------------------------ helpers
def cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m erofs_mount ARGS | cat`, as a user runs it (a pipe: the daemon must not hold it)."""
    shell = " ".join([sys.executable, "-m", "erofs_mount", *args]) + " | cat"
    return subprocess.run(["bash", "-c", "set -o pipefail; " + shell], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**env, "PYTHONPATH": REPO})


def cli_env(**kw) -> dict:
    """The caller's environment without any registry credentials (HOME=/nonexistent), plus ``kw``."""
    return env_with(PATH=os.environ["PATH"], TMPDIR=os.environ.get("TMPDIR", "/tmp"), **kw)


def files_of(manifest: dict, limit: int = 60) -> list[tuple[str, str]]:
    files = [(p, e["sha256"]) for p, e in sorted(manifest["entries"].items())
             if e["type"] == "reg" and e["size"] >= 4096 and "error" not in e]
    return files[:limit]


def mounted(mnt: Path) -> tuple[int, str]:
    m = sysfs.mount_at(str(mnt))
    assert m is not None and m.source.startswith("/dev/nbd") and m.fstype == "erofs", m
    index = sysfs.index_of(m.source)
    return index, sysfs.backend(index)


def compare(env: Env, name: str, mnt: Path) -> None:
    bad = corpuslib.compare_tree(corpuslib.load_manifest(env.images[name].manifest), mnt)
    assert bad == [], bad[:20]


def published(ident: str, newer_than: float = 0.0, timeout: float = 15) -> dict:
    """The daemon's statistics document, once it was written after ``newer_than`` (epoch)."""
    doc: dict | None = None

    def fresh() -> bool:
        nonlocal doc
        doc = state.read_json(state.stats_path(ident))
        return bool(doc) and doc.get("updated", 0) > newer_than and doc.get("pid") == daemon_pid(doc["index"])

    wait_until(fresh, timeout, f"fresh statistics in {state.stats_path(ident)}")
    return doc


def settled(ident: str) -> dict:
    """Statistics once the byte count stopped moving (read-ahead finished)."""
    last = published(ident, time.time())
    for _ in range(20):
        doc = published(ident, last["updated"])
        if doc["stats"].get("bytes_fetched") == last["stats"].get("bytes_fetched"):
            return doc
        last = doc
    return last


def read_all(mnt: Path) -> int:
    n = 0
    for root, _dirs, names in os.walk(mnt):
        for name in names:
            p = os.path.join(root, name)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    n += len(f.read())
    return n




def record_text(ident: str) -> str:
    with open(ident) as f:
        return f.read()


def assert_private(ident: str) -> None:
    assert os.stat(ident).st_mode & 0o777 == 0o600, oct(os.stat(ident).st_mode)
    assert os.stat(os.path.dirname(ident)).st_mode & 0o777 == 0o700
    assert os.path.dirname(ident) == NBD_RUN_DIR


def kill_retag_reattach_under_load(env: Env, mnt: Path, index: int, ident: str, tmp_path: Path, run_env: dict,
                                   during_window=None) -> dict:
    """Readers on the original image; SIGKILL; the tag moves to another image; `--reattach`
    (``during_window(proc)`` runs while the reattach command is under way); readers finish clean."""
    files = files_of(corpuslib.load_manifest(env.images[ORIGINAL].manifest))
    readers = Readers(mnt, files, tmp_path, n=3, max_seconds=150)
    try:
        time.sleep(0.3)
        dead_pid = daemon_pid(index)
        kill_daemon(index)
        drop_caches()  # the readers now need the device, whose daemon is dead: they block
        wait_for_blocked_reader(readers)
        e = next(e for e in lifecycle.status_entries() if e["index"] == index)
        assert (e["alive"], e["pid"], e["kind"]) == (False, dead_pid, "oci") and e["digest"], e
        env.tag("v1", env.blobs[MOVED_TO], env.blobs[ORIGINAL])  # REF now names another image
        proc = subprocess.Popen(
            ["bash", "-c", f"set -o pipefail; {sys.executable} -m erofs_mount --reattach /dev/nbd{index} | cat"],
            cwd=REPO, env={**run_env, "PYTHONPATH": REPO}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        if during_window:
            during_window(proc)
        out, err = proc.communicate(timeout=120)
        print(f"--reattach took {time.monotonic() - t0:.1f} s")
        assert proc.returncode == 0, err
        assert daemon_pid(index)
    finally:
        results = readers.finish(timeout=120)
    print("reader rounds:", [r["rounds"] for r in results])
    for r in results:
        assert r["errors"] == [] and r["bad"] == [], r
        assert r["rounds"] >= 1
    drop_caches()
    compare(env, ORIGINAL, mnt)  # still the ORIGINAL image, though REF now names another one
    return results


def unmount_clean(mnt: Path, index: int, run_env: dict) -> None:
    res = cli("-u", str(mnt), env=run_env)
    assert res.returncode == 0, res.stderr
    wait_until(lambda: not nothing_left(index), 10, "nothing left")
    assert not os.path.exists(state.stats_path(sysfs.backend(index) or f"{NBD_RUN_DIR}/mountnbd_nbd{index}"))


# ---------------------------------------------------------------------------------- scenarios
def test_config_json_credentials_cache_reuse_and_status(env, tmp_path):
    """Credentials only in a docker config.json: no secret in the record; the reattached daemon
    serves the pinned image from the persistent blob cache without refetching."""
    env.tag("v1", env.blobs[ORIGINAL], env.blobs[MOVED_TO])
    ref = f"{env.host}/{REPO_NAME}:v1"
    docker = write_json(tmp_path / "docker" / "config.json", {"auths": {env.host: docker_auth(USER, PASSWORD)}})
    run_env = cli_env(DOCKER_CONFIG=str(docker.parent))
    cache = tmp_path / "blobcache"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = cli("--mode", "nbd", "-o", f"oci.layer=0,oci.platform=linux/amd64,oci.insecure,oci.cache={cache},"
              "nbd.io_timeout=1", ref, str(mnt), env=run_env)
    assert res.returncode == 0, res.stderr
    index, ident = mounted(mnt)

    text = record_text(ident)
    rec = parse_record(text)
    digest = sha256(env.blobs[ORIGINAL])
    assert text.split("\n")[0].split(" ")[0] == "OCI_NATIVE_BLOB"
    assert len(text.split("\n")[0].split()) == 4, text  # ref platform digest: no credential token
    assert rec.digest == digest and rec.platform == "linux/amd64" and rec.ref == ref
    assert dict(rec.options)["manifest"].startswith("sha256:")
    assert rec.username is None and rec.password is None
    for secret in (PASSWORD, USER, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()):
        assert secret not in text, text
    assert ("insecure", "1") in rec.options and ("cache", str(cache)) in rec.options
    assert_private(ident)

    compare(env, ORIGINAL, mnt)
    read_all(mnt)  # the long read: every file once
    before = settled(ident)
    fetched_before = before["stats"]["bytes_fetched"]
    # the persistent cache is written behind the reads: let it catch up before the SIGKILL
    wait_until(lambda: published(ident, 0)["stats"].get("disk_bytes_written", 0) >= fetched_before, 30,
               "the blob cache to hold what was fetched")
    assert fetched_before > 0 and before["digest"] == digest
    assert not any(s in json.dumps(before) for s in (PASSWORD, "d29uZGVybGFuZA"))

    res = cli("status", env=run_env)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith(f"nbd{index} "))
    for want in (f"source={rec.ref}", "platform=linux/amd64", f"digest={digest}", f"pid={daemon_pid(index)}",
                 "daemon=alive", f"mount={mnt}", "bytes_fetched=", "cache_hit_ratio=", "retries="):
        assert want in line, (want, line)

    kill_retag_reattach_under_load(env, mnt, index, ident, tmp_path, run_env)
    read_all(mnt)  # the same long read again, page cache dropped: from the blob cache
    after = settled(ident)
    print(f"bytes fetched: first daemon {fetched_before}, reattached daemon {after['stats']['bytes_fetched']} "
          f"(disk hits {after['stats'].get('disk_hits')}, blob {len(env.blobs[ORIGINAL])} bytes)")
    assert after["stats"]["bytes_fetched"] == 0, after
    assert after["stats"]["disk_hits"] > 0 and after["carried"]["daemons"] == 1
    res = cli("status", env=run_env)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith(f"nbd{index} "))
    assert "daemon=alive" in line and "daemons=2" in line and f"bytes_fetched_total={fetched_before}(" in line, line
    assert parse_record(record_text(ident)).digest == digest  # the record still pins the original
    unmount_clean(mnt, index, run_env)


def _daemon_log() -> Path:
    from erofs_mount.daemon import log_path

    return Path(log_path("nbd"))


def test_command_line_credentials_registry_down_during_reattach(env, tmp_path):
    """Credentials only on the command line: b64 in the record (0600, 0700).  The registry is down
    when the new daemon starts; it retries (bounded) until the registry is back, and the readers,
    blocked meanwhile, resume with no error and no wrong byte."""
    env.tag("v1", env.blobs[ORIGINAL], env.blobs[MOVED_TO])
    ref = f"{env.host}/{REPO_NAME}:v1"
    run_env = cli_env()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = cli("--mode", "nbd", "-o", f"oci.layer=0,oci.platform=linux/amd64,oci.insecure,oci.username={USER},"
              f"oci.password={PASSWORD},oci.retries=20,nbd.io_timeout=1", ref, str(mnt), env=run_env)
    assert res.returncode == 0, res.stderr
    index, ident = mounted(mnt)
    first = record_text(ident).split("\n")[0].split()
    assert first[0] == "OCI_NATIVE_BLOB" and len(first) == 5, first
    assert base64.b64decode(first[4]).decode() == f"{USER}:{PASSWORD}"
    assert ("retries", "20") in parse_record(record_text(ident)).options
    assert_private(ident)
    compare(env, ORIGINAL, mnt)

    log = _daemon_log()
    start = log.stat().st_size if log.exists() else 0
    seen: dict = {}

    def registry_down(proc: subprocess.Popen) -> None:
        # stopped before the new daemon starts: it must retry until the registry is back
        def retried() -> bool:
            text = log.read_text(errors="replace")[start:] if log.exists() else ""
            return bool(re.search(r"retry \d+ in", text)) or proc.poll() is not None

        wait_until(retried, 60, "the reattaching daemon to retry")
        assert proc.poll() is None, "the reattach finished while the registry was down"
        time.sleep(2.0)  # down a little longer: more retries, still bounded
        env.restart_served()
        seen["down"] = time.monotonic() - seen["t0"]

    env.stop_served()
    seen["t0"] = time.monotonic()
    try:
        kill_retag_reattach_under_load(env, mnt, index, ident, tmp_path, run_env, during_window=registry_down)
    finally:
        if env.served.proc.poll() is not None:
            env.restart_served()
    doc = published(ident)
    print(f"registry down {seen['down']:.1f} s; the new daemon retried {doc['stats']['retries']} times")
    assert doc["stats"]["retries"] >= 1, doc
    assert doc["stats"]["retries"] <= 20
    res = cli("status", env=run_env)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith(f"nbd{index} "))
    assert "daemon=alive" in line and not re.search(r" retries=0 ", line), line
    unmount_clean(mnt, index, run_env)


def test_hand_written_erofs_utils_oci_layer_record(env, tmp_path):
    """`OCI_LAYER <ref> <platform> <index> <b64cred>` exactly as erofs-utils writes it (one line; an
    https registry, its CA trusted through SSL_CERT_FILE) is reattached: the tag is resolved again
    (as erofs-utils does), a warning names the moved digest, and the record is then pinned."""
    padded = env.blobs[ORIGINAL][:-1] + b"\x01"  # same size and tree, another digest (tail padding)
    env.tag("v1", env.blobs[ORIGINAL], env.blobs[MOVED_TO])
    host, ca = env.tls_served()
    ref = f"{host}/{REPO_NAME}:v1"
    run_env = cli_env(SSL_CERT_FILE=str(ca))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = cli("-t", "erofs.nbd", "-o", f"oci.layer=0,oci.platform=linux/amd64,oci.username={USER},"
              f"oci.password={PASSWORD},nbd.io_timeout=1", ref, str(mnt), env=run_env)
    assert res.returncode == 0, res.stderr
    index, ident = mounted(mnt)
    served = published(ident)["digest"]
    assert served == sha256(env.blobs[ORIGINAL])
    cred = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with open(ident, "w") as f:  # erofs-utils 1.9.3 mount/main.c: "OCI_LAYER %s %s %d %s\n"
        f.write(f"OCI_LAYER {ref} linux/amd64 0 {cred}\n")
    kill_daemon(index)
    env.tag("v1", padded, env.blobs[MOVED_TO])  # the tag moved (to a same-size blob)
    log = _daemon_log()
    start = log.stat().st_size if log.exists() else 0
    res = cli("--reattach", f"/dev/nbd{index}", env=run_env)
    assert res.returncode == 0, res.stderr
    text = log.read_text(errors="replace")[start:]
    assert re.search(rf"now resolves to {sha256(padded)} but the device was serving {served}", text), text[-2000:]
    rec = parse_record(record_text(ident))
    assert type(rec).__name__ == "OciNativeBlobRecord" and rec.digest == sha256(padded)
    assert (rec.username, rec.password) == (USER, PASSWORD) and [k for k, _ in rec.options] == ["manifest"]
    assert_private(ident)
    drop_caches()
    compare(env, ORIGINAL, mnt)  # the same tree: only padding differs
    unmount_clean(mnt, index, run_env)
