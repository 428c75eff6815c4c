"""Registry mirrors: registries.conf and hosts.toml read as containers/image and containerd read them
(sources/oci/mirrors.py, pure; mirrored.py's file search)."""

from __future__ import annotations

import pytest

from erofs_mount.errors import UsageError
from erofs_mount.sources.oci.mirrored import load_endpoints, registries_conf_files
from erofs_mount.sources.oci.mirrors import (choose_table, hosts_dir_names, matched_length, merge_tables,
                                             parse_hosts_toml, parse_registries_conf, plan)
from erofs_mount.sources.oci.options import OciOptions
from erofs_mount.sources.oci.reference import parse_reference

CONF = """
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "example.com/foo"
location = "internal.example:5000/bar"
[[registry.mirror]]
location = "mirror-a.example/cache/bar"
[[registry.mirror]]
location = "mirror-b.example:5001/bar"
insecure = true
pull-from-mirror = "digest-only"

[[registry]]
location = "example.com"
[[registry.mirror]]
location = "tags.example"
pull-from-mirror = "tag-only"

[[registry]]
prefix = "*.corp.example"
[[registry.mirror]]
location = "p2p.local:30020"

[[registry]]
location = "blocked.example"
blocked = true

[aliases]
"nginx" = "docker.io/library/nginx"
"""


def _tables(text=CONF, path="/etc/containers/registries.conf"):
    return parse_registries_conf(text, path)


def test_prefixes_match_as_containers_image_matches_them():
    assert matched_length("example.com/foo", "example.com/foo/app") == 15
    assert matched_length("example.com/foo", "example.com/foobar") == -1
    assert matched_length("example.com", "example.com:5000/app") == -1      # a port is another registry here
    assert matched_length("*.corp.example", "a.b.corp.example/x") == 16
    assert matched_length("*.corp.example", "a.corp.example:443/x") == 14
    assert matched_length("*.corp.example", "corp.example/x") == -1
    assert matched_length("*.corp.example", "evil.example/a.corp.example") == -1
    t = choose_table(_tables(), parse_reference("example.com/foo/app:1"))
    assert t.prefix == "example.com/foo"                                    # the longest match wins
    assert choose_table(_tables(), parse_reference("example.com/other")).prefix == "example.com"
    assert choose_table(_tables(), parse_reference("docker.io/library/x")) is None


def test_registries_conf_mirrors_in_order_with_the_rewritten_origin_last():
    ref = parse_reference("example.com/foo/app@sha256:" + "a" * 64)
    eps = plan(ref, insecure=False, tables=_tables())
    got = [(e.scheme, e.host, e.repository, e.origin, e.pull, e.resolve, e.skip_verify) for e in eps]
    assert got == [
        ("https", "mirror-a.example", "cache/bar/app", False, True, True, False),
        ("https", "mirror-b.example:5001", "bar/app", False, True, False, True),   # insecure: TLS unchecked,
        ("http", "mirror-b.example:5001", "bar/app", False, True, False, True),    # then plain HTTP
        ("https", "internal.example:5000", "bar/app", True, True, True, False),
    ]
    tag_only = plan(parse_reference("example.com/x:1"), insecure=False, tables=_tables())
    assert [(e.host, e.pull, e.resolve) for e in tag_only] == [("tags.example", False, True),
                                                               ("example.com", True, True)]


def test_a_wildcard_prefix_rewrites_nothing_but_its_mirrors_replace_the_host():
    eps = plan(parse_reference("a.corp.example/team/app:1"), insecure=False, tables=_tables())
    assert [(e.host, e.repository, e.origin) for e in eps] == [("p2p.local:30020", "team/app", False),
                                                              ("a.corp.example", "team/app", True)]


def test_mirror_by_digest_only_and_blocked():
    text = """
[[registry]]
location = "reg.example"
mirror-by-digest-only = true
[[registry.mirror]]
location = "m.example"
"""
    (e, origin) = plan(parse_reference("reg.example/a:1"), insecure=False, tables=_tables(text))
    assert (e.host, e.pull, e.resolve) == ("m.example", True, False) and origin.origin
    with pytest.raises(UsageError, match="blocked"):
        plan(parse_reference("blocked.example/a:1"), insecure=False, tables=_tables())


def test_drop_ins_replace_tables_with_the_same_prefix():
    later = _tables('[[registry]]\nlocation = "example.com"\n[[registry.mirror]]\nlocation = "new.example"\n',
                    "/etc/containers/registries.conf.d/99-new.conf")
    merged = merge_tables([_tables(), later])
    eps = plan(parse_reference("example.com/x:1"), insecure=False, tables=merged)
    assert [e.host for e in eps] == ["new.example", "example.com"]


@pytest.mark.parametrize("text, match", [
    ("[[registry]\n", "not valid TOML"),
    ('[[registry]]\nprefix = "x.example"\n', "no location"),
    ('[[registry]]\nlocation = "https://x.example"\n', "not host"),
    ('[[registry]]\nlocation = "x.example"\n[[registry.mirror]]\nlocation = "m"\npull-from-mirror = "some"\n',
     "pull-from-mirror"),
    ('[[registry]]\nlocation = "x.example"\ninsecure = "yes"\n', "true or false"),
    ('[[registry]]\nprefix = "*.x.example/a"\nlocation = ""\n', "wildcard"),
])
def test_bad_registries_conf_is_one_line_naming_the_file(text, match):
    with pytest.raises(UsageError, match=match) as exc:
        parse_registries_conf(text, "/tmp/r.conf")
    assert str(exc.value).startswith("/tmp/r.conf") and "\n" not in str(exc.value)


def test_the_v1_format_names_no_mirrors():
    assert parse_registries_conf('[registries.search]\nregistries = ["docker.io"]\n', "/r.conf") == []


HOSTS = """
server = "https://registry.example:5000"

[host."https://mirror.example"]
  capabilities = ["pull"]
  ca = "mirror.crt"
  [host."https://mirror.example".header]
    x-token = ["a", "b"]

[host."http://p2p.local:30020/us"]
  capabilities = ["pull", "resolve"]
  skip_verify = true

[host."https://raw.example/v2/custom"]
  override_path = true
"""


def test_hosts_toml_hosts_in_file_order_then_the_server():
    ref = parse_reference("registry.example:5000/team/app:1")
    hosts, server = parse_hosts_toml(HOSTS, "/etc/containerd/certs.d/registry.example:5000/hosts.toml",
                                     "/etc/containerd/certs.d/registry.example:5000", ref)
    a, b, c = hosts
    assert (a.scheme, a.host, a.api_root, a.pull, a.resolve) == ("https", "mirror.example", "/v2", True, False)
    assert a.cafiles == ("/etc/containerd/certs.d/registry.example:5000/mirror.crt",)
    assert a.headers == (("x-token", "a"), ("x-token", "b")) and a.ns == "registry.example:5000"
    assert (b.scheme, b.host, b.api_root, b.skip_verify, b.resolve) == ("http", "p2p.local:30020", "/us/v2", True, True)
    assert b.name == "p2p.local:30020/us"
    assert (c.api_root, c.pull, c.resolve) == ("/v2/custom", True, True)      # capabilities default to all
    assert (server.host, server.origin, server.ns) == ("registry.example:5000", True, None)
    eps = plan(ref, insecure=False, hosts=(hosts, server))
    assert [e.host for e in eps] == ["mirror.example", "p2p.local:30020", "raw.example", "registry.example:5000"]


def test_hosts_toml_errors_and_directory_names():
    ref = parse_reference("r.example/a:1")
    with pytest.raises(UsageError, match="unknown capability"):
        parse_hosts_toml('[host."https://m"]\ncapabilities = ["fly"]\n', "/h.toml", "/", ref)
    with pytest.raises(UsageError, match="not valid TOML"):
        parse_hosts_toml("server = \n", "/h.toml", "/", ref)
    assert hosts_dir_names("r.example:5000") == ["r.example_5000_", "r.example:5000", "_default"]
    assert hosts_dir_names("docker.io") == ["docker.io", "_default"]
    # Docker Hub: the registry-1 API host, as containerd maps it
    hosts, _ = parse_hosts_toml('[host."https://docker.io"]\n', "/h.toml", "/", parse_reference("alpine"))
    assert hosts[0].host == "registry-1.docker.io" and hosts[0].repository == "library/alpine"


def test_the_configuration_files_are_found_as_containers_finds_them(tmp_path):
    home = tmp_path / "home"
    env = {"HOME": str(home)}
    user = home / ".config" / "containers"
    (user / "registries.conf.d").mkdir(parents=True)
    (user / "registries.conf").write_text("")
    (user / "registries.conf.d" / "b.conf").write_text("")
    (user / "registries.conf.d" / "a.conf").write_text("")
    (user / "registries.conf.d" / "notes.txt").write_text("")
    assert registries_conf_files(OciOptions(), env) == [str(user / "registries.conf"),
                                                        str(user / "registries.conf.d" / "a.conf"),
                                                        str(user / "registries.conf.d" / "b.conf")]
    assert registries_conf_files(OciOptions(), {**env, "CONTAINERS_REGISTRIES_CONF": "/x.conf"}) == ["/x.conf"]
    assert registries_conf_files(OciOptions(registries_conf="/y.conf"), env) == ["/y.conf"]


def test_load_endpoints_reads_both_and_mirrors_off_reads_none(tmp_path):
    conf = tmp_path / "registries.conf"
    conf.write_text('[[registry]]\nlocation = "r.example"\n[[registry.mirror]]\nlocation = "one.example"\n')
    hosts = tmp_path / "certs.d" / "r.example"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text('[host."https://two.example"]\ncapabilities = ["pull"]\n')
    env = {"HOME": str(tmp_path), "CONTAINERS_REGISTRIES_CONF": str(conf),
           "EROFS_MOUNT_HOSTS_DIR": str(tmp_path / "certs.d")}
    ref = parse_reference("r.example/a@sha256:" + "b" * 64)
    assert [e.host for e in load_endpoints(ref, OciOptions(), env)] == ["one.example", "two.example", "r.example"]
    assert [e.host for e in load_endpoints(ref, OciOptions(mirrors=False), env)] == ["r.example"]
    with pytest.raises(UsageError, match="missing.conf"):
        load_endpoints(ref, OciOptions(registries_conf=str(tmp_path / "missing.conf")), env)


# ------------------------------------------------------------------------------ MirroredClient's choices
class _Fake:
    """A RegistryClient stand-in: serves *data* from *fail_after* pieces on, then raises *error*."""

    def __init__(self, data: bytes, error=None, fail_after: int = 0) -> None:
        self.data, self.error, self.fail_after = data, error, fail_after
        self.calls: list = []
        self.counters: dict = {}
        self._creds = None

    async def fetch_range(self, digest, start, end, *, piece=None, deliver=None, pace=None):
        self.calls.append(("blob", start, end))
        n = 0
        for off in range(start, end, piece):
            if self.error is not None and n >= self.fail_after:
                raise self.error
            deliver(off, self.data[off:min(end, off + piece)])
            n += 1

    async def get_manifest(self, reference):
        self.calls.append(("manifest", reference))
        if self.error is not None:
            raise self.error
        return b"{}", "application/json", "sha256:" + "0" * 64

    async def aclose(self):
        pass


def _mirrored(fakes, endpoints):
    import trio

    from erofs_mount.sources.oci.mirrored import MirroredClient

    async def make():
        c = MirroredClient.__new__(MirroredClient)
        c.ref, c.options, c.env, c.endpoints = parse_reference("o.example/a:1"), OciOptions(), {}, endpoints
        c._environ = {}
        c._clients = dict(enumerate(fakes))
        c._down, c._missing, c._distrusted = {}, set(), set()
        from collections import Counter
        c.served = Counter()
        c.origin = fakes[-1]
        return c
    return trio.run(make)


def test_a_broken_mirror_body_goes_on_from_the_first_missing_byte_on_the_next_host():
    import trio

    from erofs_mount.errors import NetworkError, RegistryError
    from erofs_mount.sources.oci.mirrors import Endpoint

    data = bytes(range(256)) * 64      # 16 KiB
    missing = RegistryError("no such blob")
    missing.http_status = 404
    fakes = [_Fake(data, NetworkError("reset"), fail_after=2), _Fake(data, missing), _Fake(data)]
    eps = [Endpoint("http", "m1", "a"), Endpoint("http", "m2", "a"), Endpoint("https", "o.example", "a", origin=True)]
    c = _mirrored(fakes, eps)
    digest = "sha256:" + "1" * 64

    async def main():
        got = []
        await c.fetch_range(digest, 0, len(data), piece=4096, deliver=lambda o, d: got.append((o, bytes(d))))
        assert [o for o, _ in got] == [0, 4096, 8192, 12288] and b"".join(d for _, d in got) == data
        assert c.served == {"m1": 8192, "o.example": 8192}
        assert fakes[1].calls == [("blob", 8192, len(data))] and fakes[2].calls == [("blob", 8192, len(data))]
        # m1 is down for a while, m2 lacks the blob: the next read goes straight to the origin
        await c.fetch_range(digest, 0, 4096, piece=4096, deliver=lambda o, d: None)
        assert len(fakes[0].calls) == 1 and len(fakes[1].calls) == 1 and fakes[2].calls[-1] == ("blob", 0, 4096)
        # a tag is resolved only where resolving is allowed; a 404 for a tag does not take a mirror down
        c._down.clear()
        await c.get_manifest("v1")
        assert fakes[0].calls[-1] == ("manifest", "v1") and fakes[1].calls[-1] == ("manifest", "v1")
        assert 1 not in c._down
        c.distrust(digest)
        await c.fetch_range(digest, 0, 4096, piece=4096, deliver=lambda o, d: None)
        assert fakes[2].calls[-1] == ("blob", 0, 4096) and fakes[0].calls[-1] == ("manifest", "v1")
    trio.run(main)


def test_a_pull_only_mirror_never_resolves_a_tag_and_the_origin_error_is_the_one_raised():
    import trio

    from erofs_mount.errors import AuthError
    from erofs_mount.sources.oci.mirrors import Endpoint

    fakes = [_Fake(b""), _Fake(b"", AuthError("origin refused"))]
    eps = [Endpoint("http", "m1", "a", resolve=False), Endpoint("https", "o.example", "a", origin=True)]
    c = _mirrored(fakes, eps)

    async def main():
        with pytest.raises(AuthError, match="origin refused"):
            await c.get_manifest("v1")
        assert fakes[0].calls == []
        await c.get_manifest("sha256:" + "2" * 64)      # by digest: the mirror may
        assert fakes[0].calls == [("manifest", "sha256:" + "2" * 64)]
    trio.run(main)
