import pytest

from erofs_mount.errors import UsageError
from erofs_mount.sources.oci.reference import Reference, parse_digest, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "text, registry, repo, tag, digest",
    [
        ("nginx", "docker.io", "library/nginx", "latest", None),
        ("nginx:1.25", "docker.io", "library/nginx", "1.25", None),
        ("user/app:v2", "docker.io", "user/app", "v2", None),
        ("registry.example.com/org/project/app:dev", "registry.example.com", "org/project/app", "dev", None),
        ("localhost:5000/app", "localhost:5000", "app", "latest", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("index.docker.io/nginx", "docker.io", "library/nginx", "latest", None),
        ("docker.io/nginx", "docker.io", "library/nginx", "latest", None),
        ("docker.io/library/nginx:x", "docker.io", "library/nginx", "x", None),
        (f"nginx@{D}", "docker.io", "library/nginx", None, D),
        (f"nginx:1.25@{D}", "docker.io", "library/nginx", "1.25", D),
        ("127.0.0.1:40123/team/app:v1", "127.0.0.1:40123", "team/app", "v1", None),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
        ("Registry/app", "Registry", "app", "latest", None),  # upper case: a registry
        ("a.b/c__d/e-f--g.h_i", "a.b", "c__d/e-f--g.h_i", "latest", None),
    ],
)
def test_docker_rules(text, registry, repo, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)


def test_api_host_and_keys():
    hub = parse_reference("nginx")
    assert hub.api_host == "registry-1.docker.io" and hub.is_docker_hub
    assert hub.config_keys()[0] == "https://index.docker.io/v1/"
    local = parse_reference("localhost:5000/a/b:t")
    assert local.api_host == "localhost:5000" and local.config_keys() == ["localhost:5000"]


def test_reference_and_str():
    ref = parse_reference("localhost:5000/a:t")
    assert ref.reference == "t" and str(ref) == "localhost:5000/a:t"
    pinned = ref.with_digest(D)
    assert pinned.reference == D and str(pinned) == f"localhost:5000/a:t@{D}"
    assert parse_reference(str(pinned)) == pinned


@pytest.mark.parametrize(
    "bad",
    ["", " nginx", "Nginx", "nginx:", "nginx:-x", "a//b", "http://h/a", "nginx@sha256:abc",
     "nginx@md5:" + "0" * 32, "a/B/c", "host:5000/App", "nginx@" + "sha256:" + "AB" * 32, "a" * 300, "x:y:z"],
)
def test_invalid(bad):
    with pytest.raises(UsageError):
        parse_reference(bad)


def test_digest():
    assert parse_digest(D) == D
    assert parse_digest("sha512:" + "0" * 128)
    with pytest.raises(UsageError, match="sha256"):
        parse_digest("sha256:" + "0" * 63)


def test_frozen():
    ref = Reference("r", "a")
    with pytest.raises(AttributeError):
        ref.tag = "x"  # type: ignore[misc]
