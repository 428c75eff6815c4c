import json
import platform as _platform

import pytest

from erofs_mount.errors import NotErofsError, RegistryError, UnsupportedError, UsageError
from erofs_mount.sources.oci import manifest as m

D = lambda c: "sha256:" + c * 64  # noqa: E731


def index_doc(entries, media_type=m.OCI_INDEX):
    return json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}).encode()


def entry(digest, os_="linux", arch="amd64", variant=None, features=None, mt=m.OCI_MANIFEST):
    p = {"os": os_, "architecture": arch}
    if variant:
        p["variant"] = variant
    if features:
        p["os.features"] = features
    return {"mediaType": mt, "digest": digest, "size": 100, "platform": p}


def manifest_doc(layers, media_type=m.OCI_MANIFEST):
    return json.dumps({
        "schemaVersion": 2, "mediaType": media_type,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D("c"), "size": 2},
        "layers": [{"mediaType": t, "digest": d, "size": 5000} for t, d in layers],
    }).encode()


def test_accept_has_all_four():
    for t in (m.OCI_INDEX, m.OCI_MANIFEST, m.DOCKER_LIST, m.DOCKER_MANIFEST):
        assert t in m.ACCEPT


@pytest.mark.parametrize("mt", [m.OCI_INDEX, m.DOCKER_LIST])
def test_parse_index(mt):
    idx = m.parse_manifest(index_doc([entry(D("1")), entry(D("2"), arch="arm64")], mt), None)
    assert isinstance(idx, m.Index) and idx.media_type == mt
    assert [str(d.platform) for d in idx.manifests] == ["linux/amd64", "linux/arm64/v8"]


@pytest.mark.parametrize("mt", [m.OCI_MANIFEST, m.DOCKER_MANIFEST])
def test_parse_manifest(mt):
    man = m.parse_manifest(manifest_doc([("application/vnd.erofs", D("a"))], mt), None)
    assert isinstance(man, m.Manifest) and man.layers[0].digest == D("a") and man.layers[0].size == 5000


def test_media_type_from_header_or_shape():
    doc = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert isinstance(m.parse_manifest(doc, None), m.Index)
    doc = json.dumps({"schemaVersion": 2, "layers": []}).encode()
    assert isinstance(m.parse_manifest(doc, m.DOCKER_MANIFEST + "; charset=utf-8"), m.Manifest)


@pytest.mark.parametrize("body", [b"nope", b"[]", json.dumps({"mediaType": "x/y"}).encode(),
                                  json.dumps({"mediaType": m.OCI_INDEX}).encode(),
                                  manifest_doc([("a", "sha256:zz")])])
def test_parse_bad(body):
    with pytest.raises(RegistryError):
        m.parse_manifest(body, None)


def test_platform_parse_and_normalize():
    assert str(m.parse_platform("linux/arm64")) == "linux/arm64/v8"
    assert str(m.parse_platform("linux/aarch64")) == "linux/arm64/v8"
    assert str(m.parse_platform("linux/amd64")) == "linux/amd64"
    assert str(m.parse_platform("linux/x86_64")) == "linux/amd64"
    assert str(m.parse_platform("linux/arm/7")) == "linux/arm/v7"
    assert str(m.parse_platform("Linux/ARM64/V8")) == "linux/arm64/v8"
    for bad in ("linux", "linux/", "a/b/c/d", ""):
        with pytest.raises(UsageError, match="oci.platform"):
            m.parse_platform(bad)


def test_host_platform(monkeypatch):
    monkeypatch.setattr(_platform, "machine", lambda: "aarch64")
    assert str(m.host_platform()) == "linux/arm64/v8"
    monkeypatch.setattr(_platform, "machine", lambda: "x86_64")
    assert str(m.host_platform()) == "linux/amd64"


def test_select_platform():
    idx = m.parse_manifest(index_doc([
        entry(D("1")), entry(D("2"), arch="arm64"), entry(D("3"), arch="arm", variant="v7"),
        entry(D("4"), arch="amd64", features=["erofs"]), entry(D("5"), os_="unknown", arch="unknown"),
    ]), None)
    assert m.select_platform(idx, m.parse_platform("linux/amd64")).digest == D("4")  # erofs preferred
    assert m.select_platform(idx, m.parse_platform("linux/arm64")).digest == D("2")
    assert m.select_platform(idx, m.parse_platform("linux/arm64/v8")).digest == D("2")
    assert m.select_platform(idx, m.parse_platform("linux/arm/v7")).digest == D("3")
    with pytest.raises(RegistryError, match="linux/s390x.*available: linux/amd64, linux/arm/v7, linux/arm64/v8"):
        m.select_platform(idx, m.parse_platform("linux/s390x"))
    with pytest.raises(RegistryError):
        m.select_platform(idx, m.parse_platform("linux/arm/v6"))


def test_select_platform_variant_missing_in_index():
    idx = m.parse_manifest(index_doc([entry(D("2"), arch="arm64")]), None)  # no variant given: v8
    assert m.select_platform(idx, m.parse_platform("linux/arm64/v8")).digest == D("2")


def test_select_layer():
    man = m.parse_manifest(manifest_doc([("application/vnd.erofs", D("a")), ("application/vnd.oci.image.layer.v1.tar", D("b"))]), None)
    assert m.select_layer(man, layer=1, blob=None)[1].digest == D("b")
    assert m.select_layer(man, layer=None, blob=D("b"))[0] == 1
    assert m.select_layer(man, layer=None, blob=None)[1].digest == D("a")  # the only EROFS layer
    with pytest.raises(UsageError, match="2 layers"):
        m.select_layer(man, layer=2, blob=None)
    with pytest.raises(UsageError, match="together"):
        m.select_layer(man, layer=0, blob=D("a"))
    with pytest.raises(RegistryError, match="not a layer"):
        m.select_layer(man, layer=None, blob=D("f"))
    two = m.parse_manifest(manifest_doc([("application/vnd.erofs", D("a")), ("application/vnd.erofs", D("b"))]), None)
    with pytest.raises(UsageError, match="oci.layer=0..1"):
        m.select_layer(two, layer=None, blob=None)
    one = m.parse_manifest(manifest_doc([("x/y", D("a"))]), None)
    assert m.select_layer(one, layer=None, blob=None)[0] == 0


@pytest.mark.parametrize("mt", ["application/vnd.erofs", "application/vnd.erofs.layer.v1",
                                "application/vnd.example.image.layer.v1.erofs",
                                "application/vnd.erofs.layer.v1+zstd"])  # seek table checked by open_zstd_layer
def test_media_type_accepted(mt):
    m.check_layer_media_type(m.Descriptor(mt, D("a"), 1))


@pytest.mark.parametrize("mt, msg", [
    ("application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.layer.v1.tar\\+gzip"),
    ("application/vnd.erofs+gzip", "unsupported EROFS media type"),
    ("", "not an EROFS image"),
])
def test_media_type_refused(mt, msg):
    with pytest.raises(UnsupportedError, match=msg):
        m.check_layer_media_type(m.Descriptor(mt, D("a"), 1))


def test_magic():
    good = bytes(1024) + (0xE0F5E1E2).to_bytes(4, "little") + bytes(100)
    m.check_erofs_magic(good, "x")
    with pytest.raises(NotErofsError, match="0x00000000"):
        m.check_erofs_magic(bytes(2048), "x")
    with pytest.raises(NotErofsError, match="too short"):
        m.check_erofs_magic(bytes(1000), "x")


def test_verify_digest():
    data = b"hello"
    m.verify_digest(data, m.sha256_digest(data))
    with pytest.raises(RegistryError, match="does not match"):
        m.verify_digest(b"other", m.sha256_digest(data))
