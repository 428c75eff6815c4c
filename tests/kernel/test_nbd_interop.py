"""Issue 21: erofs-mount and erofs-utils' mount.erofs reattach each other's NBD devices.

Runs the real mount.erofs named by EROFS_UTILS_MOUNT (built by hand from erofs-utils; never needed
by `make test`: skipped with a reason otherwise).  Each scenario: one tool mounts a corpus image
(local file, or the same image as a registry layer), readers hash files in a loop, that tool's
daemon is SIGKILLed while the readers need the device, the OTHER tool reattaches, the readers
finish with zero errors, the whole tree is compared with the kernel's manifest, and `erofs-mount
-u` leaves no file in /run/erofsmount.

Registries run in the guest on 127.0.0.1: TLS anonymous, TLS with Bearer tokens, plain HTTP; and
an S3 server (moto_server, SigV4 checked) for S3_OBJECT records, the keys in an s3.passwd_file.
mount.erofs has no CA option (libcurl reads the system bundle), so the guest bind-mounts a bundle
with the test CA over /etc/ssl/certs/ca-certificates.crt (the guest's own mount table: only inside
UML).  erofs-mount is given `-o oci.cafile=` (and `-o oci.insecure` for HTTP) on --reattach, which
override what an erofs-utils record cannot say.  Not tested, because erofs-utils 1.9.3 cannot: its
--reattach of a plain-HTTP registry (its record has no transport; it always uses https).
"""

from __future__ import annotations

import base64
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erofs_mount.backends.nbd import sysfs
from erofs_mount.backends.nbd.recovery import NBD_RUN_DIR
from tests import corpuslib

from .helpers import Readers, daemon_pid, drop_caches, wait_for_blocked_reader, wait_until

try:
    from tests.oci._servers import REGISTRY_BIN, USERS, Pusher, TokenIssuer, make_tls, start_registry
except ImportError:  # pragma: no cover
    REGISTRY_BIN = None

EU = os.environ.get("EROFS_UTILS_MOUNT")
REPO = str(Path(__file__).resolve().parents[2])
IMAGE = "plain-inline-4k"            # mounts on 6.1
REPO_NAME = "interop/app"
USER, PASSWORD = next(iter(USERS.items()))
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
MS_BIND = 4096
MNT_DETACH = 2

pytestmark = pytest.mark.skipif(not (EU and os.access(EU, os.X_OK)),
                                reason="EROFS_UTILS_MOUNT does not name an executable mount.erofs (erofs-utils 1.9)")


class Registries:
    def __init__(self, root: Path) -> None:
        self.root = root
        cert, key, self.ca = make_tls(root / "tls")
        self.issuer = TokenIssuer(root / "issuer", users=dict(USERS), anonymous=False).start()
        storage = root / "storage"
        self.push = start_registry(root / "push", storage)
        self.by_kind = {
            "http": start_registry(root / "http", storage),
            "tls": start_registry(root / "tls-anon", storage, tls=(cert, key, self.ca)),
            "tls-bearer": start_registry(root / "tls-bearer", storage, auth=self.issuer.registry_auth(),
                                         tls=(cert, key, self.ca)),
        }
        self.image = corpuslib.image(IMAGE)
        pusher = Pusher(self.push.url)
        try:
            pusher.image(REPO_NAME, "v1", [("application/vnd.erofs", self.image.path.read_bytes())])
        finally:
            pusher.close()
        self.bundle = root / "bundle.pem"
        self.bundle.write_bytes(Path(SYSTEM_BUNDLE).read_bytes() + b"\n" + self.ca.read_bytes())

    def close(self) -> None:
        for reg in (self.push, *self.by_kind.values()):
            reg.stop()
        self.issuer.stop()


S3_BUCKET, S3_KEY = "interop", "images/app.erofs"


@pytest.fixture(scope="module")
def regs(tmp_path_factory):
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry is not installed")
    r = Registries(tmp_path_factory.mktemp("interop"))
    trusted = False
    if os.environ.get("EROFS_MOUNT_KERNEL_TESTS") == "required":  # inside UML: the guest's own mounts
        libc = ctypes.CDLL(None, use_errno=True)
        trusted = libc.mount(str(r.bundle).encode(), SYSTEM_BUNDLE.encode(), None, MS_BIND, None) == 0
    r.trusted = trusted
    r.s3 = None
    try:
        from tests.s3._moto import MOTO_BIN, start_s3

        if MOTO_BIN is not None:
            r.s3 = start_s3(tmp_path_factory.mktemp("moto"))
            r.s3.put(S3_BUCKET, S3_KEY, r.image.path.read_bytes())
            r.passwd = r.s3.passwd_file(r.root / "s3.passwd")
        yield r
    finally:
        if r.s3 is not None:
            r.s3.stop()
        if trusted:
            ctypes.CDLL(None, use_errno=True).umount2(SYSTEM_BUNDLE.encode(), MNT_DETACH)
        r.close()


# ---------------------------------------------------------------------------------- the tools
def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Output to files, not pipes: mount.erofs 1.9.3's server keeps the caller's stdout open."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"interop-{os.getpid()}-{time.monotonic_ns()}.log"
    with open(out, "w+") as f:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, "HOME": "/nonexistent"})
        f.seek(0)
        text = f.read()
    out.unlink()
    return subprocess.CompletedProcess(cmd, proc.returncode, text, "")


def ours(*args: str) -> list[str]:
    return [sys.executable, "-m", "erofs_mount", *args]


def eu_pids() -> list[int]:
    real = os.path.realpath(EU)
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/exe") == real:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def source_args(regs: Registries, kind: str, tool: str) -> tuple[list[str], str]:
    """(-o options, SOURCE) to mount the image from ``kind`` with ``tool``."""
    if kind == "local":
        return [], str(regs.image.path)
    if kind == "s3":   # mount.erofs' form; its defaults (SigV2, virtual host, no region) spelled out
        opts = [f"s3.endpoint={regs.s3.url}", "s3.urlstyle=path", "s3.sig=4", "s3.region=us-east-1",
                f"s3.passwd_file={regs.passwd}"]
        return ["-o", ",".join(opts)], f"{S3_BUCKET}/{S3_KEY}"
    reg = regs.by_kind[kind]
    opts = ["oci.layer=0", "oci.platform=linux/amd64"]
    if kind == "http":
        opts.append("oci.insecure")
    if kind == "tls-bearer":
        opts += [f"oci.username={USER}", f"oci.password={PASSWORD}"]
    if tool == "ours" and kind.startswith("tls"):
        opts.append(f"oci.cafile={regs.ca}")
    return (["-o", ",".join(opts)] if opts else []), f"{reg.host}/{REPO_NAME}:v1"


def reattach_overrides(regs: Registries, kind: str) -> list[str]:
    """What erofs-mount is told on --reattach of an erofs-utils record (which cannot say it)."""
    if kind == "http":
        return ["-o", "oci.insecure"]
    if kind.startswith("tls"):
        return ["-o", f"oci.cafile={regs.ca}"]
    return []


def device_of(mnt: Path) -> int:
    m = sysfs.mount_at(str(mnt))
    assert m is not None and m.source.startswith("/dev/nbd") and m.fstype == "erofs", m
    return sysfs.index_of(m.source)


def run_dir_files() -> list[str]:
    return sorted(n for n in os.listdir(NBD_RUN_DIR) if not n.startswith(".")) if os.path.isdir(NBD_RUN_DIR) else []




def files_of(manifest: dict, limit: int = 60) -> list[tuple[str, str]]:
    files = [(p, e["sha256"]) for p, e in sorted(manifest["entries"].items())
             if e["type"] == "reg" and e["size"] >= 4096 and "error" not in e]
    return files[:limit]


def kill_and_reattach(regs: Registries, mnt: Path, index: int, kill, reattach_cmd: list[str], tmp_path: Path) -> None:
    manifest = corpuslib.load_manifest(regs.image.manifest)
    readers = Readers(mnt, files_of(manifest), tmp_path, n=3, max_seconds=150)
    try:
        time.sleep(0.3)
        kill()
        drop_caches()  # the readers now need the device, whose server is dead: they block
        wait_for_blocked_reader(readers)
        res = run(reattach_cmd)
        assert res.returncode == 0, res.stdout[-3000:]
    finally:
        results = readers.finish(timeout=120)
    print("reader rounds:", [r["rounds"] for r in results])
    for r in results:
        assert r["errors"] == [] and r["bad"] == [], r
        assert r["rounds"] >= 1
    drop_caches()
    bad = corpuslib.compare_tree(manifest, mnt)
    assert bad == [], bad[:20]


def unmount_clean(mnt: Path, index: int) -> None:
    res = run(ours("-u", str(mnt)))
    assert res.returncode == 0, res.stdout
    wait_until(lambda: sysfs.size_bytes(index) == 0, 15, f"nbd{index} to be disconnected")
    wait_until(lambda: not eu_pids(), 15, "mount.erofs to exit")
    assert run_dir_files() == [], run_dir_files()


KINDS = ["local", "tls", "tls-bearer", "s3"]


def _needs_trust(regs: Registries, kind: str) -> None:
    if kind == "s3" and regs.s3 is None:
        pytest.skip("moto_server is not installed")
    if kind.startswith("tls") and not regs.trusted:
        pytest.skip("mount.erofs trusts only the system CA bundle: the TLS cases run inside UML")


@pytest.mark.parametrize("kind", KINDS)
def test_erofs_mount_mounts_mount_erofs_reattaches(regs, kind, tmp_path):
    _needs_trust(regs, kind)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts, source = source_args(regs, kind, "ours")
    res = run(ours("--mode", "nbd", *opts, "-o", "nbd.io_timeout=1", source, str(mnt)))
    assert res.returncode == 0, res.stdout
    index = device_of(mnt)
    first = Path(sysfs.backend(index)).read_text().split("\n")[0]
    assert "@" not in first.split(" ")[1], first          # the reference erofs-utils can parse

    def kill():
        pid = daemon_pid(index)
        assert pid
        os.kill(pid, signal.SIGKILL)

    try:
        kill_and_reattach(regs, mnt, index, kill, [EU, "--reattach", f"/dev/nbd{index}"], tmp_path)
        assert eu_pids(), "mount.erofs is not serving the device"
    finally:
        unmount_clean(mnt, index)


@pytest.mark.parametrize("kind", KINDS + ["http"])
def test_mount_erofs_mounts_erofs_mount_reattaches(regs, kind, tmp_path):
    _needs_trust(regs, kind)
    os.makedirs(NBD_RUN_DIR, mode=0o700, exist_ok=True)  # else mount.erofs 1.9.3 falls back to ioctl mode
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts, source = source_args(regs, kind, "erofs-utils")
    res = run([EU, "-t", "erofs.nbd", *opts, source, str(mnt)])
    assert res.returncode == 0, res.stdout
    index = device_of(mnt)
    ident = sysfs.backend(index)
    assert ident and os.path.exists(ident), ident
    text = Path(ident).read_text()
    assert text.split(" ")[0] == {"local": "LOCAL", "s3": "S3_OBJECT"}.get(kind, "OCI_LAYER"), text
    if kind == "tls-bearer":
        assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() in text
    if kind == "s3":
        assert base64.b64encode(f"{regs.s3.access_key}:{regs.s3.secret_key}".encode()).decode() in text
    assert sysfs.size_bytes(index) > 1 << 60            # EROFSMOUNT_NBD_DISK_SIZE, not the image's size

    def kill():
        pids = eu_pids()
        assert pids, "no mount.erofs server"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not eu_pids(), 10, "mount.erofs to die")

    try:
        kill_and_reattach(regs, mnt, index, kill,
                          ours("--reattach", f"/dev/nbd{index}", *reattach_overrides(regs, kind)), tmp_path)
        assert daemon_pid(index), "no erofs-mount daemon serves the device"
    finally:
        unmount_clean(mnt, index)
