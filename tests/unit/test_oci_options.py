import pytest

from erofs_mount.errors import UsageError
from erofs_mount.sources.oci.options import MiB, OPTION_NAMES, OciOptions, parse_size

D = "sha256:" + "0" * 64


def test_defaults():
    o = OciOptions.from_mount_options({})
    assert o == OciOptions() and o.chunk_size == 256 * 1024 and o.memory_limit == 256 * MiB and not o.insecure
    assert o.cache is None and o.cache_limit == 4 << 30


def test_parse_all():
    o = OciOptions.from_mount_options({
        "oci.username": "u", "oci.password_file": "/p", "oci.cafile": "/ca.pem", "oci.insecure": None,
        "oci.platform": "linux/arm64", "oci.layer": "2", "oci.memory_limit": "64M", "oci.chunk_size": "256K",
        "oci.cache": "/var/tmp/c", "cache_limit": "10G",
        "oci.readahead": "8M", "oci.connections": "4", "oci.retries": "3", "oci.retry_time": "2.5",
        "oci.timeout": "1", "oci.max_request": "2M", "ro": None, "other": "x",
    })
    assert (o.username, o.password_file, o.cafile, o.insecure, o.platform, o.layer) == (
        "u", "/p", "/ca.pem", True, "linux/arm64/v8", 2)
    assert (o.cache, o.cache_limit) == ("/var/tmp/c", 10 << 30)
    assert (o.memory_limit, o.chunk_size, o.readahead, o.connections, o.retries, o.retry_time, o.timeout) == (
        64 * MiB, 256 * 1024, 8 * MiB, 4, 3, 2.5, 1.0)
    assert OciOptions.from_mount_options(o.as_mount_options()) == o
    assert OciOptions.from_mount_options({"oci.insecure": "no"}).insecure is False
    assert OciOptions.from_mount_options({"oci.cache": None}).cache == ""  # flag: the default root
    assert OciOptions.from_mount_options({"oci.cache": "none"}).cache is None
    assert OciOptions.from_mount_options({"oci.blob": D}).blob == D
    p = OciOptions.from_mount_options({"oci.username": "u", "oci.password": "s"})
    assert p.password_on_argv and p.password == "s"


@pytest.mark.parametrize("opts, needle", [
    ({"oci.layer": "x"}, "oci.layer='x'"),
    ({"oci.layer": "-1"}, "oci.layer"),
    ({"oci.layer": "0", "oci.blob": D}, "cannot be set together"),
    ({"oci.blob": "sha256:12"}, "oci.blob"),
    ({"oci.platform": "linux"}, "oci.platform"),
    ({"oci.insecure": "maybe"}, "oci.insecure"),
    ({"oci.username": ""}, "oci.username"),
    ({"oci.password": "x"}, "need oci.username"),
    ({"oci.username": "u", "oci.password": "x", "oci.password_file": "/f"}, "together"),
    ({"cache_limit": "lots"}, "cache_limit='lots'"),
    ({"oci.chunk_size": "3000K"}, "power of two"),
    ({"oci.chunk_size": "1M", "oci.memory_limit": "512K"}, "smaller than one chunk"),
    ({"oci.cache": "relative/dir"}, "absolute"),
    ({"oci.connections": "0"}, "oci.connections"),
    ({"oci.timeout": "abc"}, "oci.timeout"),
    ({"oci.typo": "1"}, "unknown option 'oci.typo'"),
])
def test_bad(opts, needle):
    with pytest.raises(UsageError) as ei:
        OciOptions.from_mount_options(opts)
    assert needle in str(ei.value)


def test_sizes():
    assert parse_size("x", "4096") == 4096 and parse_size("x", "4k") == 4096
    assert parse_size("x", "1MiB") == MiB and parse_size("x", "2G") == 2 << 30
    with pytest.raises(UsageError):
        parse_size("x", "1.5M")


def test_names():
    assert "oci.layer" in OPTION_NAMES and "cache_limit" in OPTION_NAMES
