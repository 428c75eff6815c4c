"""The CLI tools read OCI layers exactly like mounts do (-o oci.layer/oci.blob), against the real registry."""

from __future__ import annotations

import pytest

from tests import corpuslib
from tests.conftest import run_cli

PLAIN = "plain-inline-4k"


def oci(*extra: str) -> list[str]:
    return ["-o", ",".join(("oci.insecure", *extra))]


def test_ls_cat_stat_from_registry(world):
    ref = world.ref("team/app:v1")
    r = run_cli("ls", *oci("oci.layer=0"), ref, "/special", timeout=120)
    assert r.returncode == 0, r.stderr
    manifest = corpuslib.load_manifest(corpuslib.image(PLAIN).manifest)["entries"]
    assert sorted(r.stdout.decode().split()) == sorted(manifest["/special"]["children"])
    r = run_cli("cat", *oci("oci.layer=0"), ref, "/README.txt", timeout=120)
    assert r.returncode == 0 and r.stdout == corpuslib.source_bytes("/README.txt", 0, 1 << 30)
    r = run_cli("stat", *oci(f"oci.blob={world.digests['B']}"), ref, "/README.txt", timeout=120)
    assert r.returncode == 0 and f"size:    {manifest['/README.txt']['size']}" in r.stdout.decode()


def test_extract_from_registry_matches_kernel(world, tmp_path):
    ref = world.ref(f"corpus/{PLAIN}:v1")
    r = run_cli("extract", *oci("oci.layer=0"), ref, str(tmp_path / "out"), timeout=300)
    assert r.returncode == 0, r.stderr
    bad = corpuslib.compare_tree(corpuslib.load_manifest(corpuslib.image(PLAIN).manifest), tmp_path / "out",
                                 dir_size=False, dir_nlink=False)
    assert not bad, bad[:10]


def test_oci_inspect(world):
    r = run_cli("oci-inspect", *oci("oci.platform=linux/arm64"), world.ref("team/multi:v1"), timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert "platform: linux/arm64/v8" in out and world.digests["Z"] in out
    assert "application/vnd.erofs" in out


@pytest.mark.parametrize("repo, opt, message", [
    ("team/app:v1", "oci.layer=1", "layer 1 (sha256:"),  # a tar+gzip layer that is not gzip: names it
    ("team/app:v1", "oci.layer=7", "3"),             # out of range names the layer count
    ("team/notmagic:v1", "oci.layer=0", "EROFS"),
    ("team/nosuchrepo:v1", "oci.layer=0", "nosuchrepo"),
])
def test_bad_layers_one_line(world, repo, opt, message):
    r = run_cli("ls", *oci(opt), world.ref(repo), timeout=120)
    err = r.stderr.decode()
    assert r.returncode != 0 and err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_unreachable_registry_bounded_one_line():
    r = run_cli("ls", "-o", "oci.layer=0,oci.insecure,oci.retries=2,oci.timeout=2", "127.0.0.1:9/x/y:z",
                timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1 and "127.0.0.1:9" in err
