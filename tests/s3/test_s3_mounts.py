"""S3 objects mounted with the CLI in FUSE and fanotify modes (NBD: tests/kernel/test_nbd_s3.py):
a real S3 server (moto_server, signatures checked), the real kernel, the corpus comparison."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests import corpuslib
from tests.conftest import run_cli
from tests.fuse.conftest import cli_mounts
from tests.verity.test_verity_fuse import LogTail

from .conftest import put_image


@pytest.fixture
def mounts(tmp_path):
    yield from cli_mounts(tmp_path)


def manifest(name: str) -> dict:
    return corpuslib.load_manifest(corpuslib.image(name).manifest)


def status_line(mnt: str) -> str:
    time.sleep(1.5)     # the status document is rewritten every second
    out = run_cli("status").stdout.decode()
    return next(ln for ln in out.splitlines() if f" {mnt} " in ln)


def fuse_mount(s3, mnt: str, source: str, *, env: dict | None = None, extra: str = ""):
    return run_cli("--mode", "fuse", "-o", f"s3.endpoint={s3.url}" + extra, source, mnt, timeout=120,
                   env=env or s3.env())


@pytest.mark.parametrize("name", ["lz4", "plain-inline-4k"])
def test_fuse_mount_of_an_s3_object_passes_the_corpus_comparison(s3, mounts, name):
    source, _ = put_image(s3, name)
    mnt = mounts.mountpoint()
    res = fuse_mount(s3, mnt, source)
    assert res.returncode == 0, res.stderr.decode()
    assert corpuslib.compare_tree(manifest(name), mnt) == []
    line = status_line(mnt)
    assert f"source={source}" in line and re.search(r"pinned=etag:[0-9a-f]{32}", line), line


def test_erofs_utils_source_form_and_passwd_file(s3, mounts, tmp_path):
    """``BUCKET/KEY`` with s3.* options (mount.erofs' form) and keys from s3.passwd_file."""
    source, _ = put_image(s3, "lz4", "utils/form.erofs")
    pw = s3.passwd_file(tmp_path / "passwd")
    env = {k: v for k, v in s3.env().items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    mnt = mounts.mountpoint()
    res = fuse_mount(s3, mnt, source.removeprefix("s3://"), env=env,
                     extra=f",s3.passwd_file={pw},s3.urlstyle=path,s3.region=us-east-1")
    assert res.returncode == 0, res.stderr.decode()
    assert corpuslib.compare_tree(manifest("lz4"), mnt) == []


def test_an_object_replaced_under_a_fuse_mount_is_eio_and_a_log_line_never_mixed(s3, mounts):
    """Small chunks and no read-ahead: most of the image is still remote when the object is
    replaced (by a damaged copy of itself: served, its bytes would differ); every later read of a
    remote block is EIO, what was read before still reads the same, nothing reads other bytes."""
    name = "lz4"
    source, data = put_image(s3, name, "replaced/lz4.erofs")
    m = manifest(name)
    mnt = mounts.mountpoint()
    res = fuse_mount(s3, mnt, source, extra=",s3.chunk_size=4K,s3.readahead=0,s3.max_request=4K")
    assert res.returncode == 0, res.stderr.decode()
    before = corpuslib.scan_tree(mnt, content=False)   # metadata only: file bodies stay remote
    assert before
    tail = LogTail()
    s3.put("images", "replaced/lz4.erofs", bytes(b ^ 0x5A for b in data))
    problems = corpuslib.compare_tree(m, mnt)
    assert problems, "no read failed after the object was replaced"
    assert all("EIO" in p for p in problems), [p for p in problems if "EIO" not in p][:5]
    deadline = time.monotonic() + 10
    while "changed since it was mounted" not in tail.text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "changed since it was mounted" in tail.text() or os.geteuid() != 0


def test_wrong_credentials_missing_objects_and_mixed_options_fail_with_one_line(s3, mounts):
    source, _ = put_image(s3, "lz4", "errors/lz4.erofs")
    cases = [
        (source, s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret"), "", "SignatureDoesNotMatch"),
        (source, s3.env(AWS_ACCESS_KEY_ID="AKIAUNKNOWNUNKNOWN00"), "", "InvalidAccessKeyId"),
        ("s3://images/errors/none.erofs", s3.env(), "", "no such object"),
        ("s3://nobucket/x.erofs", s3.env(), "", "no bucket 'nobucket'"),
        (source, s3.env(), ",oci.layer=0", "oci.* and s3.*"),
        (source, s3.env(), ",s3.sig=3", "s3.sig"),
    ]
    for src, env, extra, want in cases:
        mnt = mounts.mountpoint()
        t0 = time.monotonic()
        res = fuse_mount(s3, mnt, src, env=env, extra=extra)
        err = res.stderr.decode().strip().splitlines()
        assert res.returncode != 0, (src, extra)
        assert len(err) == 1 and want in err[0], (want, err)
        assert "Traceback" not in res.stderr.decode()
        assert time.monotonic() - t0 < 60


def test_cat_and_ls_tools_read_an_s3_object(s3):
    source, _ = put_image(s3, "lz4", "tools/lz4.erofs")
    path, entry = next((p, e) for p, e in sorted(corpuslib.source_files().items()) if e[1] > 0)
    res = run_cli("cat", "-o", f"s3.endpoint={s3.url}", source, path, env=s3.env())
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == corpuslib.source_bytes(path, 0, entry[1])
    res = run_cli("ls", "-o", f"s3.endpoint={s3.url}", source, "/", env=s3.env())
    assert res.returncode == 0, res.stderr.decode()
    assert all(line.strip() for line in res.stdout.decode().splitlines())


# -- fanotify -----------------------------------------------------------------------------------
from tests.fanotify.conftest import fan  # noqa: E402,F401 - the fixture


def test_fanotify_mount_of_an_s3_object_and_its_reattach_after_sigkill(s3, fan, tmp_path):  # noqa: F811
    source, _ = put_image(s3, "lz4", "fan/lz4.erofs")
    fan.env.update({k: v for k, v in s3.env().items() if k.startswith("AWS_")})
    res, mnt = fan.mount(source, f"s3.endpoint={s3.url}")
    assert res.returncode == 0, res.stderr
    assert corpuslib.compare_tree(manifest("lz4"), mnt) == []
    doc = fan.doc(mnt)
    assert doc["spec"]["oci"].get("s3.etag"), "the record does not pin the ETag"
    os.kill(doc["pids"]["daemon"], signal.SIGKILL)
    from tests.fanotify.conftest import cli

    res = cli("--reattach", mnt, env=fan.env)
    assert res.returncode == 0, res.stderr
    assert corpuslib.compare_tree(manifest("lz4"), mnt) == []


def test_fanotify_mount_fails_with_one_line_on_a_missing_object(s3, fan):  # noqa: F811
    fan.env.update({k: v for k, v in s3.env().items() if k.startswith("AWS_")})
    res, _mnt = fan.mount("s3://images/fan/none.erofs", f"s3.endpoint={s3.url}")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such object" in lines[0], lines


def test_an_object_replaced_under_a_fanotify_mount_is_eio_and_a_log_line(s3, fan, tmp_path):  # noqa: F811
    """A big file stays remote after the mount (only metadata is made local): the object replaced,
    its read is EIO (the sparse file keeps its hole), the daemon logs the change, and what was local
    before still reads the same."""
    import random
    import subprocess

    tree = tmp_path / "tree"
    tree.mkdir()
    rng = random.Random(7)
    big = rng.randbytes(6 << 20)
    (tree / "big.bin").write_bytes(big)
    (tree / "small.txt").write_bytes(b"small\n" * 10)
    img = tmp_path / "img.erofs"
    subprocess.run(["mkfs.erofs", "-Enoinline_data", str(img), str(tree)], check=True, capture_output=True)
    data = img.read_bytes()
    s3.put("images", "fan/big.erofs", data)
    fan.env.update({k: v for k, v in s3.env().items() if k.startswith("AWS_")})
    log_path = "/var/log/erofs-mount/fanotify.log"
    start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    res, mnt = fan.mount("s3://images/fan/big.erofs", f"s3.endpoint={s3.url}")
    assert res.returncode == 0, res.stderr
    assert open(os.path.join(mnt, "small.txt"), "rb").read() == b"small\n" * 10
    s3.put("images", "fan/big.erofs", bytes(b ^ 0x5A for b in data))
    assert corpuslib.read_errno(os.path.join(mnt, "big.bin")) == 5   # EIO
    assert open(os.path.join(mnt, "small.txt"), "rb").read() == b"small\n" * 10
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
        if "changed since it was mounted" in text:
            break
        time.sleep(0.2)
    assert "changed since it was mounted" in text, text[-2000:]
