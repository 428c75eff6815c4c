"""Recovery records: round trips, erofs-utils hand-written records, refusals."""

from __future__ import annotations

import base64
import errno

import pytest

from erofs_mount.backends.nbd import recovery
from erofs_mount.backends.nbd.recovery import (
    S3ObjectRecord,
    describe,
    LocalRecord,
    OciLayerRecord,
    OciNativeBlobRecord,
    format_record,
    parse_record,
)
from erofs_mount.errors import ErofsMountError

DIGEST = "sha256:" + "ab" * 32

ROUND_TRIP = [
    LocalRecord("/srv/images/a.erofs"),
    LocalRecord("/path with spaces/img  two.erofs"),
    LocalRecord("/x", (("note", "a=b c"),)),
    OciLayerRecord("docker.io/library/app:1", "linux/amd64", 0),
    OciLayerRecord("localhost:5000/app:v2", "linux/arm64/v8", 3, "user", "p:a ss"),
    OciNativeBlobRecord("127.0.0.1:5000/app:v1", "linux/amd64", DIGEST),
    OciNativeBlobRecord("127.0.0.1:5000/app:v1", "linux/amd64", DIGEST, "u", "", (("insecure", "1"),)),
    OciNativeBlobRecord("r/app", "linux/amd64", DIGEST, "", "secret"),
]


@pytest.mark.parametrize("record", ROUND_TRIP, ids=repr)
def test_round_trip(record):
    text = format_record(record)
    assert text.endswith("\n")
    assert parse_record(text) == record


# Records exactly as erofs-utils 1.9.3 mount/main.c writes them (fprintf formats, incl. the
# trailing space when there are no credentials) or as a person writes them by hand.
EROFS_UTILS = [
    ("LOCAL /var/lib/images/base.erofs\n", LocalRecord("/var/lib/images/base.erofs")),
    ("LOCAL /no/newline.erofs", LocalRecord("/no/newline.erofs")),
    ("LOCAL /a b/c\n", LocalRecord("/a b/c")),
    ("OCI_LAYER quay.io/org/img:tag linux/amd64 2 \n", OciLayerRecord("quay.io/org/img:tag", "linux/amd64", 2)),
    (
        "OCI_LAYER img:tag linux/amd64 0 dXNlcjpwYXNz\n",
        OciLayerRecord("img:tag", "linux/amd64", 0, "user", "pass"),
    ),
    (
        f"OCI_NATIVE_BLOB reg/img:tag linux/amd64 {DIGEST} \n",
        OciNativeBlobRecord("reg/img:tag", "linux/amd64", DIGEST),
    ),
    (
        f"OCI_NATIVE_BLOB reg/img:tag  linux/amd64   {DIGEST} dTpw\n",  # runs of spaces are skipped
        OciNativeBlobRecord("reg/img:tag", "linux/amd64", DIGEST, "u", "p"),
    ),
    ("OCI_LAYER img linux/amd64 1 dTpw\n", OciLayerRecord("img", "linux/amd64", 1, "u", "p")),
    ("OCI_LAYER img linux/amd64 1 dTpwdw\n", OciLayerRecord("img", "linux/amd64", 1, "u", "pw")),  # unpadded
]


@pytest.mark.parametrize("text,expected", EROFS_UTILS)
def test_erofs_utils_records(text, expected):
    assert parse_record(text) == expected


def test_our_oci_record_uses_erofs_utils_token_rules():
    text = format_record(OciNativeBlobRecord("reg/img:tag", "linux/amd64", DIGEST, "user", "pass"))
    first = text.split("\n")[0]
    kind, rest = first.split(" ", 1)
    tokens = [t for t in rest.split(" ") if t]
    assert kind == "OCI_NATIVE_BLOB"
    assert tokens == ["reg/img:tag", "linux/amd64", DIGEST, "dXNlcjpwYXNz"]


def test_no_credentials_no_token():
    text = format_record(OciNativeBlobRecord("reg/img", "linux/amd64", DIGEST))
    assert text == f"OCI_NATIVE_BLOB reg/img linux/amd64 {DIGEST}\n"


def test_options_go_after_the_first_line():
    text = format_record(LocalRecord("/x", (("insecure", "1"),)))
    assert text == "LOCAL /x\ninsecure=1\n"


BAD = [
    "",
    "\n",
    "LOCAL\n",
    "LOCAL relative/path\n",
    "NFS /x\n",
    "local /x\n",
    "OCI_LAYER img linux/amd64\n",
    "OCI_LAYER img linux/amd64 x1\n",
    "OCI_LAYER img linux/amd64 -1\n",
    f"OCI_NATIVE_BLOB img linux/amd64 sha256:{'ab' * 31}\n",
    f"OCI_NATIVE_BLOB img linux/amd64 {DIGEST.upper()}\n",
    "OCI_NATIVE_BLOB img linux/amd64 md5:abc\n",
    f"OCI_NATIVE_BLOB img linux/amd64 {DIGEST} !!notb64!!\n",
    f"OCI_NATIVE_BLOB img linux/amd64 {DIGEST} bm9jb2xvbg==\n",  # "nocolon"
    f"OCI_NATIVE_BLOB img linux/amd64 {DIGEST} dTpw extra tokens\n",
    "LOCAL /x\nnot an option\n",
]


@pytest.mark.parametrize("text", BAD)
def test_malformed_records_are_refused(text):
    with pytest.raises(ErofsMountError) as info:
        parse_record(text)
    assert info.value.errno == errno.EINVAL
    assert "record" in str(info.value)


def test_s3_object_record_as_erofs_utils_writes_it():
    """mount/main.c erofsmount_write_recovery_s3: "S3_OBJECT %s %s %d %d %s %s\n" — urlstyle and
    sig as enums, "(nil)" for no region, a trailing space for no credentials."""
    rec = parse_record("S3_OBJECT my-bucket/dir/foo.erofs s3.amazonaws.com 1 0 (nil) \n")
    assert rec == S3ObjectRecord("my-bucket/dir/foo.erofs", "s3.amazonaws.com", 1, 0, None)
    assert format_record(rec) == "S3_OBJECT my-bucket/dir/foo.erofs s3.amazonaws.com 1 0 (nil) \n"
    cred = base64.b64encode(b"AKIAX:se/cr+et").decode()
    text = f"S3_OBJECT b/k http://127.0.0.1:9000 0 1 eu-west-1 {cred}\ns3.etag=abc\ns3.version_id=v1\n"
    rec = parse_record(text)
    assert (rec.endpoint, rec.url_style, rec.sig, rec.region) == ("http://127.0.0.1:9000", 0, 1, "eu-west-1")
    assert (rec.access_key, rec.secret_key) == ("AKIAX", "se/cr+et")
    assert dict(rec.options) == {"s3.etag": "abc", "s3.version_id": "v1"}
    assert format_record(rec) == text
    assert "se/cr+et" not in repr(rec) and "se/cr+et" not in describe(rec)
    assert describe(rec) == "s3://b/k (ETag abc)"


@pytest.mark.parametrize("text", [
    "S3_OBJECT b/k endpoint 1 0\n",                       # no region
    "S3_OBJECT bucketonly endpoint 1 0 (nil) \n",          # no key
    "S3_OBJECT b/k endpoint 2 0 (nil) \n",                 # url style out of range
    "S3_OBJECT b/k endpoint 1 4 (nil) \n",                 # sig is an enum, not the version
    "S3_OBJECT b/k endpoint 1 0 (nil) !!notb64!!\n",
    "S3_OBJECT b/k endpoint 1 0 (nil) dTpw extra\n",
])
def test_malformed_s3_records_are_refused(text):
    with pytest.raises(ErofsMountError) as info:
        parse_record(text)
    assert info.value.errno == errno.EINVAL
    assert "record" in str(info.value)


@pytest.mark.parametrize(
    "record",
    [
        LocalRecord("relative"),
        LocalRecord("/new\nline"),
        OciLayerRecord("img ref", "linux/amd64", 0),
        OciLayerRecord("img", "", 0),
        OciLayerRecord("img", "linux/amd64", -1),
        OciNativeBlobRecord("img", "linux/amd64", "sha256:short"),
        LocalRecord("/x", (("bad key", "v"),)),
    ],
    ids=repr,
)
def test_unwritable_records(record):
    with pytest.raises(ErofsMountError):
        format_record(record)


def test_credentials_codec_matches_erofs_utils():
    # erofs-utils lib/base64.c: standard alphabet, '=' padding
    assert recovery.encode_credentials("user", "pass") == "dXNlcjpwYXNz"
    assert recovery.encode_credentials(None, None) == "Og=="
    assert recovery.decode_credentials("Og==") == ("", "")
    assert recovery.decode_credentials("dTpwOnE=") == ("u", "p:q")


def test_record_path():
    assert recovery.record_path(3) == "/var/run/erofsmount/nbd/mountnbd_nbd3"
    assert recovery.record_path(0, "/tmp/r") == "/tmp/r/mountnbd_nbd0"


def test_password_not_in_repr():
    assert "secret" not in repr(OciNativeBlobRecord("r", "p", DIGEST, "u", "secret"))
