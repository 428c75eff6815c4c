"""FUSE mounts through registry mirrors (sources/oci/mirrors.py, mirrored.py): real registries, the real
kernel's FUSE, the full corpus comparison; the origin's access log says what the origin served."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from tests import corpuslib
from tests.conftest import run_cli
from tests.fuse.conftest import cli_mounts
from tests.oci._servers import blob_bytes

from .conftest import MirrorWorld


@pytest.fixture
def mounts(tmp_path):
    yield from cli_mounts(tmp_path)


def manifest(name: str) -> dict:
    return corpuslib.load_manifest(corpuslib.image(name).manifest)


def mount(w: MirrorWorld, tmp_path, mnt: str, ref: str, env: dict, extra: str = ""):
    opts = f"oci.layer=0,oci.cache=none,{w.origin_opts(tmp_path)}" + extra
    res = run_cli("--mode", "fuse", "-o", opts, ref, mnt, timeout=120, env=env)
    assert res.returncode == 0, res.stderr.decode()
    return res


def hosts_of(mnt: str) -> dict[str, int]:
    """``hosts=`` of the mount's status line: host -> bytes as printed (size text)."""
    time.sleep(1.5)     # the status document is rewritten every second
    out = run_cli("status").stdout.decode()
    line = next(ln for ln in out.splitlines() if f" {mnt} " in ln)
    m = re.search(r" hosts=(\S+)", line)
    return dict(item.rsplit("=", 1) for item in m.group(1).split(",")) if m else {}


def dead_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_a_mount_through_a_mirror_fetches_no_blob_byte_from_the_origin(mworld, tmp_path, mounts):
    """The mirror wants bob (its own config.json entry), the origin alice (the command line): a
    mirror sent alice's credentials refuses, and the origin's log would show the blob bytes."""
    w = mworld
    before = w.origin_blob_bytes()
    env = w.env(tmp_path, w.conf(tmp_path / "r.conf", w.mirror.host))
    mnt = mounts.mountpoint()
    mount(w, tmp_path, mnt, w.ref("lz4"), env)
    assert corpuslib.compare_tree(manifest("lz4"), mnt) == []
    assert w.origin_blob_bytes() == before, "the origin served blob bytes"
    assert blob_bytes(w.mirror, w.images["lz4"].digest) > 0
    hosts = hosts_of(mnt)
    assert list(hosts) == [w.mirror.host], hosts


def test_a_mirror_that_is_down_is_skipped(mworld, tmp_path, mounts):
    w = mworld
    before = w.origin_blob_bytes()
    down = f"127.0.0.1:{dead_port()}"
    env = w.env(tmp_path, w.conf(tmp_path / "r.conf", down, w.mirror.host))
    mnt = mounts.mountpoint()
    t0 = time.monotonic()
    mount(w, tmp_path, mnt, w.ref("plain-inline-4k"), env)
    assert corpuslib.compare_tree(manifest("plain-inline-4k"), mnt) == []
    assert time.monotonic() - t0 < 60
    assert w.origin_blob_bytes() == before


def test_a_mirror_stopped_mid_read_leaves_the_rest_to_the_origin(mworld, tmp_path, mounts):
    """A mirror of our own (a registry process on the mirror's storage) killed after half the files
    were read: the other half comes from the origin, with no error for the reader."""
    from tests.oci._servers import start_registry

    w = mworld
    mine = start_registry(tmp_path / "mine", w.stores["mirror"], access_log=True)
    try:
        env = w.env(tmp_path, w.conf(tmp_path / "r.conf", mine.host))
        mnt = mounts.mountpoint()
        before = w.origin_blob_bytes()
        # small chunks and no read-ahead beyond them: what is not read yet is not fetched yet
        mount(w, tmp_path, mnt, w.ref("plain-inline-4k"), env,
              ",oci.chunk_size=16K,oci.readahead=0,oci.memory_limit=64K,verity=off")
        m = manifest("plain-inline-4k")
        files = sorted(p for p, e in m["entries"].items() if e.get("type") == "reg" and e.get("size", 0) > 0)
        half = len(files) // 2
        for p in files[:half]:
            with open(mnt + p, "rb") as f:
                f.read()
        assert w.origin_blob_bytes() == before
        mine.proc.send_signal(signal.SIGKILL)
        mine.proc.wait(timeout=10)
        assert corpuslib.compare_tree(m, mnt) == []      # every file, the rest through the origin
        assert w.origin_blob_bytes() > before
        hosts = hosts_of(mnt)
        assert set(hosts) == {mine.host, w.origin.host}, hosts
    finally:
        mine.stop()


def test_a_mirror_serving_a_damaged_blob_costs_the_reader_nothing_with_verity(mworld, tmp_path, mounts):
    """The damaged mirror first: the block that does not verify is fetched again from the origin
    (the mirror is not asked for that blob again); zero wrong bytes, no EIO."""
    w = mworld
    env = w.env(tmp_path, w.conf(tmp_path / "r.conf", w.bad.host))
    mnt = mounts.mountpoint()
    before = w.origin_blob_bytes()
    mount(w, tmp_path, mnt, w.ref("plain-inline-4k"), env)       # pinned: the annotation's root hash
    assert corpuslib.compare_tree(manifest("plain-inline-4k"), mnt) == []
    assert w.origin_blob_bytes() > before
    out = run_cli("status").stdout.decode()
    line = next(ln for ln in out.splitlines() if f" {mnt} " in ln)
    assert "verity=verified:" in line and ",failed:0" in line, line


def test_a_damaged_tar_layer_from_a_mirror_is_read_again_from_the_origin(mworld, tmp_path, mounts):
    w = mworld
    env = w.env(tmp_path, w.conf(tmp_path / "r.conf", w.bad.host))
    mnt = mounts.mountpoint()
    mount(w, tmp_path, mnt, w.tgz_ref(), env)
    for path in sorted(corpuslib.source_files())[:200]:
        with open(mnt + path, "rb") as f:
            assert f.read() == corpuslib.source_bytes(path, 0, 1 << 30), path
    assert blob_bytes(w.origin, w.tgz[1]) >= len(w.tgz[0])


def test_hosts_toml_pull_only_mirror_never_resolves_a_tag(mworld, tmp_path, mounts):
    """containerd's hosts.toml: a mirror with capabilities = ["pull"] serves the blobs; the tag is
    resolved by the origin (its log shows the manifest by tag), and the mirror gets ?ns=."""
    w = mworld
    hosts_dir = tmp_path / "certs.d"
    d = hosts_dir / w.origin.host
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(f'[host."http://{w.mirror.host}"]\n  capabilities = ["pull"]\n')
    env = w.env(tmp_path, EROFS_MOUNT_HOSTS_DIR=str(hosts_dir))
    env.pop("CONTAINERS_REGISTRIES_CONF", None)
    env["CONTAINERS_REGISTRIES_CONF"] = str(tmp_path / "empty.conf")
    (tmp_path / "empty.conf").write_text("")
    mnt = mounts.mountpoint()
    before = w.origin_blob_bytes()
    mount(w, tmp_path, mnt, f"{w.origin.host}/team/lz4:v1", env)
    assert corpuslib.compare_tree(manifest("lz4"), mnt) == []
    assert w.origin_blob_bytes() == before
    origin_log = (w.origin.workdir / "registry.log").read_text()
    assert '"GET /v2/team/lz4/manifests/v1 HTTP/1.1" 200' in origin_log
    mirror_log = (w.mirror.workdir / "registry.log").read_text()
    assert "/manifests/v1" not in mirror_log
    assert re.search(r"/v2/team/lz4/blobs/sha256:[0-9a-f]+\?ns=" + re.escape(w.origin.host.replace(":", "%3A")),
                     mirror_log)


def test_a_pull_through_cache_fetches_each_blob_from_the_origin_once(mworld, tmp_path, mounts):
    """docker-registry's pull-through cache as the mirror of an anonymous origin: the first mount
    makes it fill itself from the origin; a second mount takes nothing more from the origin."""
    w = mworld
    digest = w.images["lz4"].digest
    host = w.origin_anon.host
    conf = tmp_path / "r.conf"
    conf.write_text(f'[[registry]]\nlocation = "{host}"\n[[registry.mirror]]\nlocation = "{w.pullthrough.host}"\n'
                    f'insecure = true\n')
    env = w.env(tmp_path, conf)
    served = []
    for n in range(2):
        before = blob_bytes(w.origin_anon, digest)
        mnt = mounts.mountpoint(f"m{n}")
        res = run_cli("--mode", "fuse", "-o", "oci.layer=0,oci.cache=none,oci.insecure",
                      f"{host}/team/lz4@{w.images['lz4'].manifest}", mnt, timeout=120, env=env)
        assert res.returncode == 0, res.stderr.decode()
        assert corpuslib.compare_tree(manifest("lz4"), mnt) == []
        assert list(hosts_of(mnt)) == [w.pullthrough.host]
        assert run_cli("-u", mnt, timeout=60).returncode == 0
        served.append(blob_bytes(w.origin_anon, digest) - before)
    assert served[0] > 0 and served[1] == 0, served
    assert blob_bytes(w.pullthrough, digest) > 0


def test_mirrors_off_and_a_bad_configuration(mworld, tmp_path, mounts):
    w = mworld
    env = w.env(tmp_path, w.conf(tmp_path / "r.conf", w.mirror.host))
    mnt = mounts.mountpoint()
    before = w.origin_blob_bytes()
    mount(w, tmp_path, mnt, w.ref("lz4"), env, ",oci.mirrors=no")
    assert corpuslib.compare_tree(manifest("lz4"), mnt) == []
    assert w.origin_blob_bytes() > before
    assert run_cli("-u", mnt, timeout=60).returncode == 0
    bad = tmp_path / "bad.conf"
    bad.write_text('[[registry]]\nlocation = "x"\n[[registry.mirror]]\nlocation = "m"\npull-from-mirror = "sometimes"\n')
    res = run_cli("--mode", "fuse", "-o", f"oci.layer=0,{w.origin_opts(tmp_path)}", w.ref("lz4"), mnt,
                  timeout=60, env=w.env(tmp_path, bad))
    err = res.stderr.decode().strip()
    assert res.returncode != 0 and len(err.splitlines()) == 1 and str(bad) in err and "pull-from-mirror" in err, err
    assert not os.path.ismount(mnt)
