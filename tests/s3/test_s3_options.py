"""S3 sources without a server: the location, ``-o s3.*`` options, object URLs, cache keys
(sources/s3/options.py), the s3fs password file, credentials and signatures (signing.py), and S3
error documents (client.py ``error_code``)."""

from __future__ import annotations

import os

import httpx
import pytest
import trio

from erofs_mount.errors import AuthError, UsageError
from erofs_mount.sources.oci.options import OciOptions
from erofs_mount.sources.s3.client import error_code
from erofs_mount.sources.s3.options import (
    S3Location,
    S3Options,
    cache_key,
    endpoint_parts,
    is_s3_source,
    object_url,
    parse_location,
    use_path_style,
)
from erofs_mount.sources.s3.signing import S3Credentials, S3Signer, read_passwd_file, resolve

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# -- the location ------------------------------------------------------------------------------

@pytest.mark.parametrize("source, bucket, key, version", [
    ("s3://images/corpus/lz4.erofs", "images", "corpus/lz4.erofs", None),
    ("s3://images/a", "images", "a", None),
    ("s3://my.bucket-1/dir/sub/x.img", "my.bucket-1", "dir/sub/x.img", None),
    ("s3://images/k.img?versionId=3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY", "images", "k.img",
     "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY"),
    ("s3://images/k.img?versionId=abc%2Bdef", "images", "k.img", "abc+def"),
    ("s3://images/k.img?versionId=null", "images", "k.img", "null"),
    # erofs-utils' BUCKET/KEY (mount/main.c: split at the first '/')
    ("images/corpus/lz4.erofs", "images", "corpus/lz4.erofs", None),
    ("bucket/key", "bucket", "key", None),
    # no query in the erofs-utils form: a '?' is part of the key
    ("bucket/key?versionId=1", "bucket", "key?versionId=1", None),
    ("s3://images/a b/c+d~e", "images", "a b/c+d~e", None),
    ("s3://images/dir/", "images", "dir/", None),
])
def test_parse_location(source, bucket, key, version):
    loc = parse_location(source)
    assert loc == S3Location(bucket, key, version)
    assert str(loc) == f"s3://{bucket}/{key}"
    assert loc.source == f"{bucket}/{key}"


def test_location_round_trips_through_its_spellings():
    loc = parse_location("s3://images/corpus/lz4.erofs")
    assert parse_location(str(loc)) == loc
    assert parse_location(loc.source) == loc
    assert is_s3_source("s3://images/x") and not is_s3_source("images/x") and not is_s3_source("docker://x")


@pytest.mark.parametrize("source, message", [
    ("s3://images", "no object key"),
    ("s3://images/", "no object key"),
    ("images", "no object key"),
    ("images/", "no object key"),
    ("s3://", "no object key"),
    ("s3:///key", "is not an S3 bucket name"),
    ("s3://b/key", "'b' is not an S3 bucket name"),             # too short
    ("s3://-images/key", "'-images' is not an S3 bucket name"),
    ("s3://.images/key", "is not an S3 bucket name"),
    ("s3://my bucket/key", "'my bucket' is not an S3 bucket name"),
    ("s3://bucket:80/key", "is not an S3 bucket name"),
    ("s3://" + "a" * 256 + "/key", "is not an S3 bucket name"),
    ("s3://images/a\nb", "not a valid S3 key"),
    ("s3://images/a\x00b", "not a valid S3 key"),
    ("s3://images/" + "k" * 1025, "not a valid S3 key"),
    ("s3://images/" + "é" * 513, "not a valid S3 key"),       # 1026 bytes of UTF-8
    ("s3://images/key?versionId=", "only query an s3:// source takes is \\?versionId="),
    ("s3://images/key?versionId", "only query an s3:// source takes is \\?versionId="),
    ("s3://images/key?version=3", "only query an s3:// source takes is \\?versionId="),
    ("s3://images/key?versionId=1&versionId=2", "only query an s3:// source takes is \\?versionId="),
    ("s3://images/key?versionId=1&x=2", "only query an s3:// source takes is \\?versionId="),
    ("s3://images/key?", "only query an s3:// source takes is \\?versionId="),
])
def test_parse_location_refusals(source, message):
    with pytest.raises(UsageError, match=message) as info:
        parse_location(source)
    assert info.value.exit_status == 2


def test_parse_location_longest_key_accepted():
    assert parse_location("s3://images/" + "k" * 1024).key == "k" * 1024


# -- -o s3.* options ---------------------------------------------------------------------------

def test_defaults():
    o = S3Options.from_mount_options({})
    assert o == S3Options()
    assert (o.endpoint, o.region, o.path_style, o.sig, o.passwd_file, o.profile, o.anonymous,
            o.version_id, o.etag) == (None, None, None, 4, None, None, False, None, None)
    assert o.transfer == OciOptions()
    assert o.as_mount_options() == {}


def test_each_option():
    o = S3Options.from_mount_options({
        "s3.endpoint": "http://127.0.0.1:9000", "s3.region": "eu-west-1", "s3.urlstyle": "path",
        "s3.sig": "2", "s3.passwd_file": "/etc/passwd-s3fs", "s3.profile": "work",
        "s3.version_id": "3HL4kqtJlcpXro", "s3.etag": '"0123abcd"',
    })
    assert o.endpoint == "http://127.0.0.1:9000" and o.region == "eu-west-1"
    assert o.path_style is True and o.sig == 2
    assert o.passwd_file == "/etc/passwd-s3fs" and o.profile == "work"
    assert o.version_id == "3HL4kqtJlcpXro"
    assert o.etag == "0123abcd"          # quotes dropped
    assert o.anonymous is False


@pytest.mark.parametrize("opt, value, field, expected", [
    ("s3.urlstyle", "path", "path_style", True),
    ("s3.urlstyle", "vhost", "path_style", False),
    ("s3.urlstyle", "PATH", "path_style", True),
    ("s3.path_style", None, "path_style", True),
    ("s3.path_style", "", "path_style", True),
    ("s3.path_style", "0", "path_style", False),
    ("s3.path_style", "yes", "path_style", True),
    ("s3.sig", "4", "sig", 4),
    ("s3.sig", "2", "sig", 2),
    ("s3.anonymous", None, "anonymous", True),
    ("s3.anonymous", "off", "anonymous", False),
    ("s3.region", "us-east-1", "region", "us-east-1"),
    ("s3.region", "ap-southeast-2", "region", "ap-southeast-2"),
    ("s3.region", "garage", "region", "garage"),
    ("s3.endpoint", "minio.example.com:9000", "endpoint", "minio.example.com:9000"),
    ("s3.endpoint", "https://s3.eu-west-1.amazonaws.com", "endpoint", "https://s3.eu-west-1.amazonaws.com"),
    ("s3.endpoint", "http://[::1]:9000/prefix", "endpoint", "http://[::1]:9000/prefix"),
    ("s3.etag", "abc", "etag", "abc"),
])
def test_option_values(opt, value, field, expected):
    assert getattr(S3Options.from_mount_options({opt: value}), field) == expected


def test_other_options_are_ignored():
    # the mount's own options and oci.* (the caller refuses oci.* for an S3 source) are not S3's business
    o = S3Options.from_mount_options({"ro": None, "allow_other": None, "oci.layer": "3", "s3x": "1"})
    assert o == S3Options()


@pytest.mark.parametrize("options, message", [
    ({"s3.bogus": "1"}, r"unknown option 's3\.bogus'"),
    ({"s3.cachedir": "/x"}, r"unknown option 's3\.cachedir'"),
    ({"s3.username": "me"}, r"unknown option 's3\.username'"),       # an oci.* transfer-free name
    ({"s3.sig": "3"}, r"invalid s3\.sig='3': expected 4 or 2"),
    ({"s3.sig": "v4"}, r"invalid s3\.sig='v4'"),
    ({"s3.sig": None}, r"invalid s3\.sig=None"),
    ({"s3.urlstyle": "virtual"}, r"invalid s3\.urlstyle='virtual': expected vhost or path"),
    ({"s3.urlstyle": ""}, r"invalid s3\.urlstyle=''"),
    ({"s3.path_style": "maybe"}, r"invalid s3\.path_style='maybe'"),
    ({"s3.anonymous": "sure"}, r"invalid s3\.anonymous='sure'"),
    ({"s3.region": "EU-WEST-1"}, r"invalid s3\.region='EU-WEST-1': not a region name"),
    ({"s3.region": "eu_west_1"}, r"invalid s3\.region='eu_west_1'"),
    ({"s3.region": "-eu"}, r"invalid s3\.region='-eu'"),
    ({"s3.region": ""}, r"option s3\.region needs a value"),
    ({"s3.region": None}, r"option s3\.region needs a value"),
    ({"s3.region": "eu west"}, r"option s3\.region needs a value without spaces"),
    ({"s3.endpoint": "ftp://host"}, r"invalid s3\.endpoint='ftp://host'"),
    ({"s3.endpoint": "http://"}, r"invalid s3\.endpoint='http://'"),
    ({"s3.endpoint": "http://host/?x=1"}, r"invalid s3\.endpoint='http://host/\?x=1'"),
    ({"s3.endpoint": "http://host/#frag"}, r"invalid s3\.endpoint"),
    ({"s3.endpoint": "http://host:99999"}, r"invalid s3\.endpoint='http://host:99999': bad port"),
    ({"s3.endpoint": "host:port"}, r"invalid s3\.endpoint='host:port': bad port"),
    ({"s3.endpoint": ""}, r"option s3\.endpoint needs a value"),
    ({"s3.endpoint": "http://a b"}, r"option s3\.endpoint needs a value without spaces"),
    ({"s3.passwd_file": None}, r"option s3\.passwd_file needs a value"),
    ({"s3.profile": ""}, r"option s3\.profile needs a value"),
    ({"s3.version_id": None}, r"option s3\.version_id needs a value"),
    ({"s3.etag": "a,b"}, r"option s3\.etag needs a value without spaces"),
    ({"s3.anonymous": None, "s3.passwd_file": "/etc/passwd-s3fs"},
     r"s3\.anonymous and s3\.passwd_file cannot be set together"),
    ({"s3.chunk_size": "lots"}, r"invalid s3\.chunk_size='lots'"),
    ({"s3.chunk_size": "1K"}, r"invalid s3\.chunk_size='1K': must be at least 4096"),
    ({"s3.retries": "x"}, r"invalid s3\.retries='x'"),
    ({"s3.timeout": "soon"}, r"invalid s3\.timeout='soon'"),
    ({"s3.cache": "relative/dir"}, r"invalid s3\.cache='relative/dir': expected an absolute directory"),
    ({"cache_limit": "big"}, r"invalid cache_limit='big'"),
])
def test_option_refusals(options, message):
    with pytest.raises(UsageError, match=message):
        S3Options.from_mount_options(options)


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(UsageError) as info:
        S3Options.from_mount_options({"s3.endpiont": "http://x"})
    text = str(info.value)
    for name in ("s3.endpoint", "s3.passwd_file", "s3.region", "s3.sig", "s3.urlstyle", "s3.chunk_size"):
        assert name in text


@pytest.mark.parametrize("options, named", [
    ({"s3.chunk_size": "12K"}, "s3.chunk_size"),                         # not a power of two
    ({"s3.chunk_size": "1M", "s3.memory_limit": "512K"}, "s3.memory_limit"),
])
def test_cross_field_refusals_name_the_s3_option(options, named):
    with pytest.raises(UsageError) as info:
        S3Options.from_mount_options(options)
    assert named in str(info.value) and "oci." not in str(info.value)


def test_transfer_options_land_in_transfer():
    o = S3Options.from_mount_options({
        "s3.chunk_size": "1M", "s3.cache": "/x", "cache_limit": "2G", "s3.memory_limit": "64M",
        "s3.readahead": "8M", "s3.max_request": "4M", "s3.connections": "3", "s3.retries": "2",
        "s3.retry_time": "5", "s3.timeout": "7.5", "s3.cafile": "/etc/ca.pem",
    })
    t = o.transfer
    assert isinstance(t, OciOptions)
    assert t.chunk_size == MiB and t.cache == "/x" and t.cache_limit == 2 * GiB
    assert t.memory_limit == 64 * MiB and t.readahead == 8 * MiB and t.max_request == 4 * MiB
    assert t.connections == 3 and t.retries == 2 and t.retry_time == 5.0 and t.timeout == 7.5
    assert t.cafile == "/etc/ca.pem"
    # nothing else moved
    assert o.endpoint is None and o.sig == 4 and o.path_style is None


@pytest.mark.parametrize("value, cache", [(None, ""), ("", ""), ("auto", ""), ("yes", ""), ("none", None),
                                          ("off", None), ("/var/tmp/c", "/var/tmp/c")])
def test_cache_option_spellings(value, cache):
    assert S3Options.from_mount_options({"s3.cache": value}).transfer.cache == cache


def test_verity_options_land_in_transfer():
    root = "ab" * 32
    o = S3Options.from_mount_options({"verity.roothash": root, "verity": "require"})
    assert o.transfer.verity_root == root and o.transfer.verity == "require"


@pytest.mark.parametrize("options", [
    {},
    {"s3.endpoint": "http://127.0.0.1:9000", "s3.region": "eu-west-1", "s3.urlstyle": "path", "s3.sig": "2",
     "s3.passwd_file": "/root/.passwd-s3fs", "s3.version_id": "v1", "s3.etag": "abc"},
    {"s3.urlstyle": "vhost", "s3.profile": "work", "s3.anonymous": None},
    {"s3.path_style": None, "s3.chunk_size": "1M", "s3.cache": "/x", "cache_limit": "1G", "s3.memory_limit": "32M",
     "s3.readahead": "2M", "s3.max_request": "8M", "s3.connections": "2", "s3.retries": "1",
     "s3.retry_time": "3.5", "s3.timeout": "4", "s3.cafile": "/ca.pem"},
    {"s3.cache": None},
    {"verity.roothash": "cd" * 32, "verity.hashoffset": "4096"},
])
def test_as_mount_options_round_trip(options):
    o = S3Options.from_mount_options(options)
    mo = o.as_mount_options()
    assert all(isinstance(v, str) for v in mo.values())
    assert all(k.startswith("s3.") or k in ("cache_limit", "verity", "verity.roothash", "verity.hashoffset")
               for k in mo)
    assert not any(k.startswith("oci.") for k in mo)
    assert S3Options.from_mount_options(mo) == o
    assert S3Options.from_mount_options(mo).as_mount_options() == mo


def test_as_mount_options_spells_erofs_utils_names():
    o = S3Options.from_mount_options({"s3.path_style": None, "s3.sig": "2", "s3.chunk_size": "1M",
                                      "cache_limit": "1G"})
    assert o.as_mount_options() == {"s3.urlstyle": "path", "s3.sig": "2", "s3.chunk_size": str(MiB),
                                    "cache_limit": str(GiB)}
    assert S3Options(path_style=False).as_mount_options() == {"s3.urlstyle": "vhost"}
    assert S3Options(sig=4).as_mount_options() == {}


# -- endpoints, addressing, URLs ----------------------------------------------------------------

@pytest.mark.parametrize("endpoint, parts", [
    ("http://127.0.0.1:9000", ("http", "127.0.0.1:9000", "")),
    ("https://s3.amazonaws.com/", ("https", "s3.amazonaws.com", "")),
    ("minio.local:9000", ("https", "minio.local:9000", "")),      # no scheme: https (erofs-utils)
    ("s3.example.com", ("https", "s3.example.com", "")),
    ("http://host:80/some/prefix/", ("http", "host:80", "/some/prefix")),
    ("  http://host  ", ("http", "host", "")),
    ("http://[::1]:9000", ("http", "[::1]:9000", "")),
])
def test_endpoint_parts(endpoint, parts):
    assert endpoint_parts(endpoint) == parts


@pytest.mark.parametrize("choice, scheme, host, bucket, path", [
    # an IP address or localhost as the endpoint: path style
    (None, "http", "127.0.0.1:9000", "images", True),
    (None, "https", "10.1.2.3", "images", True),
    (None, "http", "[::1]:9000", "images", True),
    (None, "http", "[2001:db8::1]", "images", True),
    (None, "http", "localhost:9000", "images", True),
    (None, "http", "localhost", "images", True),
    # a DNS name: virtual host where the bucket is a DNS label
    (None, "https", "s3.eu-west-1.amazonaws.com", "images", False),
    (None, "http", "minio.example.com:9000", "images-2", False),
    # a dotted bucket: fine under http, not under https (the certificate would not match)
    (None, "https", "s3.amazonaws.com", "my.bucket", True),
    (None, "http", "s3.example.com", "my.bucket", False),
    # a bucket that is no DNS name
    (None, "https", "s3.amazonaws.com", "Images", True),
    (None, "https", "s3.amazonaws.com", "my_bucket", True),
    (None, "http", "s3.example.com", "a..b", True),
    (None, "https", "s3.amazonaws.com", "bucket-", True),
    (None, "https", "s3.amazonaws.com", "b" * 64, True),
    # an explicit choice wins either way
    (True, "https", "s3.amazonaws.com", "images", True),
    (False, "http", "127.0.0.1:9000", "images", False),
    (False, "https", "s3.amazonaws.com", "my.bucket", False),
])
def test_use_path_style(choice, scheme, host, bucket, path):
    assert use_path_style(choice, scheme, host, bucket) is path


@pytest.mark.parametrize("endpoint, key, path_style, version, url", [
    ("https://s3.eu-west-1.amazonaws.com", "a b/c+d~e", None, None,
     "https://images.s3.eu-west-1.amazonaws.com/a%20b/c%2Bd~e"),
    ("http://127.0.0.1:9000", "a b/c+d~e", None, None,
     "http://127.0.0.1:9000/images/a%20b/c%2Bd~e"),
    ("https://s3.amazonaws.com", "corpus/lz4.erofs", True, None,
     "https://s3.amazonaws.com/images/corpus/lz4.erofs"),
    ("http://localhost:9000", "corpus/lz4.erofs", False, None,
     "http://images.localhost:9000/corpus/lz4.erofs"),
    ("minio.example.com:9000", "x.img", None, None, "https://images.minio.example.com:9000/x.img"),
    ("http://host:9000/prefix/", "x.img", True, None, "http://host:9000/prefix/images/x.img"),
    ("http://host:9000/prefix", "x.img", False, None, "http://images.host:9000/prefix/x.img"),
    ("https://s3.amazonaws.com", "k.img", None, "3HL4kq/tJl+c=",
     "https://images.s3.amazonaws.com/k.img?versionId=3HL4kq%2FtJl%2Bc%3D"),
    ("http://127.0.0.1:9000", "k.img", None, "null", "http://127.0.0.1:9000/images/k.img?versionId=null"),
    # every byte but A-Za-z0-9-._~/ is encoded (SigV4's canonical URI), UTF-8 first
    ("http://127.0.0.1:9000", "é?#%&=*!'()", None, None,
     "http://127.0.0.1:9000/images/%C3%A9%3F%23%25%26%3D%2A%21%27%28%29"),
    ("http://127.0.0.1:9000", "dir//x/", None, None, "http://127.0.0.1:9000/images/dir//x/"),
    ("http://127.0.0.1:9000", "A-Z_a.z~0/9", None, None, "http://127.0.0.1:9000/images/A-Z_a.z~0/9"),
])
def test_object_url(endpoint, key, path_style, version, url):
    assert object_url(endpoint, S3Location("images", key), path_style=path_style, version_id=version) == url


def test_object_url_of_a_dotted_bucket_under_https_is_path_style():
    loc = S3Location("my.images", "x.img")
    assert object_url("https://s3.amazonaws.com", loc, path_style=None) == "https://s3.amazonaws.com/my.images/x.img"
    assert object_url("http://s3.example.com", loc, path_style=None) == "http://my.images.s3.example.com/x.img"


def test_object_url_bad_endpoint():
    with pytest.raises(UsageError, match="invalid s3.endpoint"):
        object_url("gopher://x", S3Location("images", "k"), path_style=None)


def test_cache_key():
    loc = S3Location("images", "corpus/lz4.erofs")
    ep = "http://127.0.0.1:9000"
    k = cache_key(ep, loc, "etag1", None)
    assert k.startswith("s3obj:") and len(k) == len("s3obj:") + 64
    int(k.partition(":")[2], 16)
    assert cache_key(ep, loc, "etag1", None) == k                     # stable
    others = {
        cache_key(ep, loc, "etag2", None),                           # another ETag
        cache_key(ep, loc, "etag1", "v1"),                           # a version
        cache_key(ep, loc, "etag1", "v2"),
        cache_key("http://127.0.0.1:9001", loc, "etag1", None),      # another endpoint
        cache_key(ep, S3Location("images2", loc.key), "etag1", None),
        cache_key(ep, S3Location("images", "corpus/lz4.erofs2"), "etag1", None),
    }
    assert k not in others and len(others) == 6
    # the fields are separated: moving a character from one to the next is another key
    assert cache_key(ep, S3Location("ab", "c"), "e", None) != cache_key(ep, S3Location("a", "bc"), "e", None)


# -- the password file -------------------------------------------------------------------------

def write(tmp_path, text: str, name: str = "passwd-s3fs", mode: int = 0o600) -> str:
    p = tmp_path / name
    p.write_text(text)
    os.chmod(p, mode)
    return str(p)


@pytest.mark.parametrize("text, bucket, pair", [
    ("AKIAEXAMPLE:secret/Key+1\n", "images", ("AKIAEXAMPLE", "secret/Key+1")),
    ("AKIAEXAMPLE:secret", "images", ("AKIAEXAMPLE", "secret")),                      # no newline at the end
    ("  AKIAEXAMPLE:secret  \r\n", "images", ("AKIAEXAMPLE", "secret")),
    ("# keys\n\nAKIAEXAMPLE:secret\n", "images", ("AKIAEXAMPLE", "secret")),
    ("images:AK1:SK1\n", "images", ("AK1", "SK1")),
    ("other:AK0:SK0\nimages:AK1:SK1\n", "images", ("AK1", "SK1")),
    ("images:AK1:SK1\nother:AK0:SK0\n", "images", ("AK1", "SK1")),
    # the bucket's own line first, before a generic one wherever it is
    ("AKG:SKG\nimages:AK1:SK1\n", "images", ("AK1", "SK1")),
    ("images:AK1:SK1\nAKG:SKG\n", "images", ("AK1", "SK1")),
    ("other:AK0:SK0\nAKG:SKG\n", "images", ("AKG", "SKG")),
    ("AKG:SKG\nAKH:SKH\n", "images", ("AKG", "SKG")),                                 # the first generic
])
def test_read_passwd_file(tmp_path, text, bucket, pair):
    assert read_passwd_file(write(tmp_path, text), bucket) == pair


@pytest.mark.parametrize("text", [
    "", "\n\n", "# only a comment\n", "justonefield\n", "other:AK0:SK0\n", "a:b:c:d\n", ":secret\n", "AK:\n",
    "images::SK\n",
])
def test_read_passwd_file_without_a_usable_line(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(UsageError, match=r"no ACCESS:SECRET line \(for bucket images\)") as info:
        read_passwd_file(path, "images")
    assert path in str(info.value)


def test_read_passwd_file_missing(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(UsageError, match=r"s3\.passwd_file=.*nope: No such file or directory"):
        read_passwd_file(path, "images")


def test_read_passwd_file_not_a_file(tmp_path):
    with pytest.raises(UsageError, match="not a regular file"):
        read_passwd_file(str(tmp_path), "images")


def test_read_passwd_file_too_large_or_binary(tmp_path):
    with pytest.raises(UsageError, match="too large for a key file"):
        read_passwd_file(write(tmp_path, "AK:SK\n" + "#" * (65 << 10)), "images")
    p = tmp_path / "bin"
    p.write_bytes(b"\xff\xfe\x00AK:SK")
    with pytest.raises(UsageError, match="not text"):
        read_passwd_file(str(p), "images")


def test_read_passwd_file_readable_by_others_warns(tmp_path, caplog):
    path = write(tmp_path, "AK:SK\n", mode=0o644)
    with caplog.at_level("WARNING", logger="erofs_mount.sources.s3"):
        assert read_passwd_file(path, "images") == ("AK", "SK")
    assert "can be read by group or others" in caplog.text


# -- credentials (botocore's chain, from a clean environment) -----------------------------------

@pytest.fixture
def aws_env(tmp_path, monkeypatch):
    """No AWS variable of this machine, and AWS config files of the test's own (none yet)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    config, creds = tmp_path / "aws-config", tmp_path / "aws-credentials"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return config, creds


LOC = S3Location("images", "corpus/lz4.erofs")


def frozen(creds: S3Credentials):
    return creds.creds.get_frozen_credentials()


def test_resolve_from_env(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SKENV")
    creds, region = resolve(S3Options(), LOC)
    assert region == "us-east-1"
    assert creds.origin == "env"
    f = frozen(creds)
    assert (f.access_key, f.secret_key, f.token) == ("AKENV", "SKENV", None)
    assert creds.static_pair == ("AKENV", "SKENV")
    # a session token: temporary, never kept
    monkeypatch.setenv("AWS_SESSION_TOKEN", "TOKEN")
    creds, _ = resolve(S3Options(), LOC)
    assert frozen(creds).token == "TOKEN" and creds.static_pair is None


def test_resolve_nothing_found_is_unsigned(aws_env):
    assert resolve(S3Options(), LOC) == (None, "us-east-1")


def test_resolve_region(aws_env, monkeypatch):
    config, _ = aws_env
    assert resolve(S3Options(region="eu-central-1"), LOC)[1] == "eu-central-1"
    config.write_text("[default]\nregion = ap-south-1\n[profile p]\nregion = sa-east-1\n")
    assert resolve(S3Options(), LOC)[1] == "ap-south-1"
    assert resolve(S3Options(profile="p"), LOC)[1] == "sa-east-1"
    assert resolve(S3Options(region="eu-central-1", profile="p"), LOC)[1] == "eu-central-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    assert resolve(S3Options(), LOC)[1] == "eu-north-1"


def test_resolve_profile(aws_env, monkeypatch):
    _, creds_file = aws_env
    creds_file.write_text("[default]\naws_access_key_id = AKDEF\naws_secret_access_key = SKDEF\n"
                          "[p]\naws_access_key_id = AKP\naws_secret_access_key = SKP\n")
    creds, _ = resolve(S3Options(), LOC)
    assert frozen(creds).access_key == "AKDEF" and creds.origin == "shared-credentials-file"
    creds, _ = resolve(S3Options(profile="p"), LOC)
    assert (frozen(creds).access_key, frozen(creds).secret_key) == ("AKP", "SKP")
    assert creds.static_pair is None          # a file's keys are read again, not kept in a record
    with pytest.raises(UsageError, match="s3.profile=nope: no such profile"):
        resolve(S3Options(profile="nope"), LOC)


def test_resolve_precedence(aws_env, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SKENV")
    pw = write(tmp_path, "images:AKPW:SKPW\n")
    # anonymous: nothing, whatever else there is
    assert resolve(S3Options(anonymous=True), LOC) == (None, "us-east-1")
    # a recovery record's pair, then the password file, then the chain
    creds, _ = resolve(S3Options(passwd_file=pw), LOC, ("AKREC", "SKREC"))
    assert frozen(creds).access_key == "AKREC" and creds.origin == "recovery record"
    assert creds.static_pair == ("AKREC", "SKREC")
    creds, _ = resolve(S3Options(passwd_file=pw), LOC)
    assert frozen(creds).access_key == "AKPW" and creds.origin == "s3.passwd_file"
    assert creds.static_pair == ("AKPW", "SKPW")
    with pytest.raises(UsageError, match="no ACCESS:SECRET line"):
        resolve(S3Options(passwd_file=pw), S3Location("other", "k"))


def test_resolve_failing_credential_process(aws_env):
    config, _ = aws_env
    config.write_text("[default]\ncredential_process = /bin/false\n")
    with pytest.raises(AuthError, match=r"s3://images/corpus/lz4\.erofs: AWS credentials"):
        resolve(S3Options(), LOC)


def test_resolve_missing_credential_process(aws_env):
    config, _ = aws_env
    config.write_text("[default]\ncredential_process = /nonexistent/helper --json\n")
    with pytest.raises(AuthError, match="AWS credentials"):
        resolve(S3Options(), LOC)


# -- signatures --------------------------------------------------------------------------------

def sign(sig: int, creds: S3Credentials | None, url: str, auth_path="/images/k.img") -> httpx.Request:
    req = httpx.Request("GET", url, headers={"Range": "bytes=0-0", "If-Match": '"abc"'})
    signer = S3Signer(creds, "eu-west-1", sig, lambda u: auth_path)
    trio.run(signer.sign, req)
    return req


def static(ak="AKIDEXAMPLE", sk="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY") -> S3Credentials:
    import botocore.credentials

    return S3Credentials(botocore.credentials.Credentials(ak, sk), "env")


def test_sign_v4():
    req = sign(4, static(), "http://127.0.0.1:9000/images/k.img?versionId=v1")
    auth = req.headers["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/s3/aws4_request" in auth
    signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
    assert "host" in signed and "range" in signed and "if-match" in signed and "x-amz-date" in signed
    assert req.headers["X-Amz-Date"] and req.headers["X-Amz-Content-SHA256"]
    assert req.headers["Range"] == "bytes=0-0"     # the request's own headers stay


def test_sign_v2():
    req = sign(2, static(), "http://127.0.0.1:9000/images/k.img")
    auth = req.headers["Authorization"]
    assert auth.startswith("AWS AKIDEXAMPLE:") and not auth.startswith("AWS4")
    assert "Date" in req.headers
    # the signature covers the canonical resource: another path, another signature
    other = sign(2, static(), "http://127.0.0.1:9000/images/k.img", auth_path="/images/other.img")
    assert other.headers["Date"] != req.headers["Date"] or other.headers["Authorization"] != auth


def test_sign_anonymous():
    req = sign(4, None, "http://127.0.0.1:9000/images/k.img")
    assert "Authorization" not in req.headers and "X-Amz-Date" not in req.headers


# -- S3 error documents ------------------------------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
     b'<Message>The specified key does not exist.</Message><Key>k.img</Key>'
     b'<RequestId>4442587FB7D0A2F9</RequestId></Error>',
     ("NoSuchKey", "The specified key does not exist.")),
    (b"<Error>\n  <Code> SignatureDoesNotMatch </Code>\n  <Message>The request signature we calculated does "
     b"not match the signature you provided.</Message>\n</Error>\n",
     ("SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided.")),
    (b"<Error><Code>AccessDenied</Code></Error>", ("AccessDenied", "")),
    (b"<Error><Message>only a message</Message></Error>", ("", "only a message")),
    # junk
    (b"", ("", "")),
    (b"not xml at all", ("", "")),
    (b"<html><body>502 Bad Gateway</body></html>", ("", "")),
    (b"<Error><Code>NoSuchKey</Code>", ("", "")),                  # cut short
    (b"<Error><Code>A</Code></Error><trailing/>", ("", "")),
    (b"\xff\xfe<Error>\x00", ("", "")),
    (b" " * 600 + b"<Error><Code>Late</Code></Error>", ("", "")),  # no error document at its start
])
def test_error_code(body, expected):
    assert error_code(body) == expected
