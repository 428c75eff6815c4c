"""Recovery records across tools: what erofs-utils 1.9 writes parses here, and what we write parses
by erofs-utils' own rules (a small re-implementation of its tokenizer and reference parser below,
each function citing the C it follows), so either tool can --reattach the other's devices."""

from __future__ import annotations

import base64

import pytest

from erofs_mount.backends.nbd.recovery import (LocalRecord, OciLayerRecord, OciNativeBlobRecord, format_record,
                                               parse_record)
from erofs_mount.backends.nbd.source import override_record, pinned_record, record_for_oci
from erofs_mount.backends.nbd.worker import reattach_size
from erofs_mount.errors import ErofsMountError, UsageError
from erofs_mount.sources.oci.options import OciOptions

BLOB = "sha256:" + "ab" * 32
MANIFEST = "sha256:" + "cd" * 32
CRED = base64.b64encode(b"alice:s3cret pass").decode()


# ---- erofs-utils' rules (v1.9.3) ------------------------------------------------------------
def eu_open_recovery_source(text: str) -> tuple[str, str]:
    """mount/main.c erofsmount_open_recovery_source: getline() (the first line only), strip one
    trailing newline, split the type at the first space."""
    line = text.split("\n", 1)[0]
    kind, sep, source = line.partition(" ")
    if not sep:
        raise ValueError("invalid source in recovery file")
    return kind, source


def eu_tokens(source: str) -> tuple[str, list[str]]:
    """mount/main.c erofsmount_parse_recovery_ocilayer/_ociblob: up to 4 times strchr(p, ' '),
    NUL there, skip a run of spaces, stop at the end; the image ref is what precedes the first
    space.  A 4th token would keep the rest of the line, but only three are used."""
    ref, _, _ = source.partition(" ")
    tokens: list[str] = []
    p = source.find(" ")
    while len(tokens) < 4 and p >= 0:
        q = p + 1
        while q < len(source) and source[q] == " ":
            q += 1
        if q == len(source):
            break
        nxt = source.find(" ", q)
        tokens.append(source[q:] if len(tokens) == 3 or nxt < 0 else source[q:nxt])
        p = nxt
    return ref, tokens


def eu_parse(text: str) -> dict:
    kind, source = eu_open_recovery_source(text)
    if kind == "LOCAL":
        return {"kind": kind, "path": source}
    if kind not in ("OCI_LAYER", "OCI_NATIVE_BLOB"):
        raise ValueError(f"EOPNOTSUPP {kind}")
    ref, tokens = eu_tokens(source)
    if len(tokens) < 2:
        raise ValueError("EINVAL: fewer than 2 tokens")
    out = {"kind": kind, "ref": ref, "platform": tokens[0]}
    if kind == "OCI_LAYER":
        if not tokens[1].isdigit():           # strtoul with the whole token consumed
            raise ValueError("EINVAL: layer index")
        out["layer"] = int(tokens[1])
    else:
        if not tokens[1].startswith("sha256:") or len(tokens[1]) != 71:
            raise ValueError("EINVAL: digest")
        out["digest"] = tokens[1]
    if len(tokens) > 2:                        # lib/remotes/oci.c ocierofs_decode_userpass
        raw = base64.b64decode(tokens[2]).decode()
        user, colon, password = raw.partition(":")
        if not colon:
            raise ValueError("EINVAL: credentials")
        out["cred"] = (user, password)
    return out


def eu_parse_ref(ref: str) -> tuple[str, str, str]:
    """lib/remotes/oci.c ocierofs_parse_ref: (registry, repository, tag); no digest references."""
    registry, tag = "registry-1.docker.io", "latest"
    slash = ref.find("/")
    repo_part = ref
    if slash >= 0:
        dot, colon = ref.find("."), ref.find(":")
        if 0 <= dot < slash or 0 <= colon < slash:
            registry, repo_part = ref[:slash], ref[slash + 1:]
    repo, colon, rest = repo_part.partition(":")
    if colon:
        tag = rest
    if "/" not in repo and registry in ("registry-1.docker.io", "docker.io"):
        repo = "library/" + repo
    return registry, repo, tag


# ---- what erofs-utils 1.9 writes, read here --------------------------------------------------
@pytest.mark.parametrize("line, want", [
    ("LOCAL /srv/images/app.erofs\n", LocalRecord("/srv/images/app.erofs")),
    ("LOCAL /srv/my images/a b.erofs\n", LocalRecord("/srv/my images/a b.erofs")),
    # erofs-utils prints "" for missing credentials: a trailing space (mount/main.c :945)
    ("OCI_LAYER 127.0.0.1:5000/e2e/app:v1 linux/amd64 0 \n",
     OciLayerRecord("127.0.0.1:5000/e2e/app:v1", "linux/amd64", 0)),
    (f"OCI_LAYER registry.example.com/org/app:2.1 linux/arm64 3 {CRED}\n",
     OciLayerRecord("registry.example.com/org/app:2.1", "linux/arm64", 3, "alice", "s3cret pass")),
    (f"OCI_NATIVE_BLOB localhost:5000/app:v1 linux/amd64 {BLOB} \n",
     OciNativeBlobRecord("localhost:5000/app:v1", "linux/amd64", BLOB)),
    (f"OCI_NATIVE_BLOB localhost:5000/app:v1 linux/amd64 {BLOB} {CRED}\n",
     OciNativeBlobRecord("localhost:5000/app:v1", "linux/amd64", BLOB, "alice", "s3cret pass")),
])
def test_erofs_utils_lines_parse(line, want):
    got = parse_record(line)
    assert got == want
    assert getattr(got, "password", None) == getattr(want, "password", None)
    assert eu_parse(line)  # and the re-implementation agrees they are well formed


def test_the_reimplementation_is_erofs_utils():
    """Spot checks of the quirks the re-implementation must have (else the next test proves nothing)."""
    assert eu_tokens("ref  linux/amd64   0 ") == ("ref", ["linux/amd64", "0"])
    with pytest.raises(ValueError):
        eu_parse("OCI_LAYER ref linux/amd64\n")
    with pytest.raises(ValueError):
        eu_parse("OCI_NATIVE_BLOB ref linux/amd64 sha256:abc\n")
    assert eu_parse("OCI_LAYER r p 1\nmore=1\n")["layer"] == 1          # later lines never read
    assert eu_parse_ref("reg.io:5000/a/b:v1@sha256:00") == ("reg.io:5000", "a/b", "v1@sha256:00")
    assert eu_parse_ref("nginx") == ("registry-1.docker.io", "library/nginx", "latest")


# ---- what we write, read by erofs-utils' rules ------------------------------------------------
@pytest.mark.parametrize("options, cred", [
    (OciOptions(), None),
    (OciOptions(insecure=True, cafile="/etc/ca.pem"), None),
    (OciOptions(username="alice", password="s3cret pass"), ("alice", "s3cret pass")),
])
def test_our_oci_records_parse_by_erofs_utils_rules(options, cred):
    rec = record_for_oci(f"127.0.0.1:5000/e2e/app:v1@{MANIFEST}", "linux/amd64", BLOB, options)
    text = format_record(rec)
    eu = eu_parse(text)
    assert eu["kind"] == "OCI_NATIVE_BLOB" and eu["digest"] == BLOB and eu["platform"] == "linux/amd64"
    assert eu.get("cred") == cred
    # the reference is one erofs-utils resolves to the same registry, repository and tag
    assert eu_parse_ref(eu["ref"]) == ("127.0.0.1:5000", "e2e/app", "v1")
    # and we read it back with the manifest pin and every option line
    back = parse_record(text)
    assert back == rec and dict(back.options)["manifest"] == MANIFEST
    if options.insecure:
        assert dict(back.options)["insecure"] == "1"


def test_our_local_record_parses_by_erofs_utils_rules():
    text = format_record(LocalRecord("/srv/my images/app.erofs"))
    assert eu_parse(text) == {"kind": "LOCAL", "path": "/srv/my images/app.erofs"}


def test_records_of_the_previous_version_still_read():
    """Before: the manifest digest in the first line's reference; still accepted."""
    old = f"OCI_NATIVE_BLOB 127.0.0.1:5000/e2e/app:v1@{MANIFEST} linux/amd64 {BLOB}\ninsecure=1\n"
    rec = parse_record(old)
    assert rec.ref.endswith("@" + MANIFEST) and dict(rec.options) == {"insecure": "1"}


def test_pinning_an_erofs_utils_layer_record_moves_the_manifest_to_its_line():
    class Src:
        ref = f"127.0.0.1:5000/e2e/app:v1@{MANIFEST}"
        platform = "linux/amd64"
        digest = BLOB
    rec = pinned_record(OciLayerRecord("127.0.0.1:5000/e2e/app:v1", "linux/amd64", 0, "u", "p"), Src())
    assert rec.ref == "127.0.0.1:5000/e2e/app:v1" and dict(rec.options) == {"manifest": MANIFEST}
    assert eu_parse(format_record(rec))["cred"] == ("u", "p")


# ---- --reattach DEV -o oci.* -------------------------------------------------------------------
EU_LAYER = OciLayerRecord("127.0.0.1:5000/e2e/app:v1", "linux/amd64", 0)


def test_override_insecure_and_cafile():
    rec = override_record(EU_LAYER, {"insecure": "", "cafile": "/tmp/ca.pem"})
    assert dict(rec.options) == {"insecure": "1", "cafile": "/tmp/ca.pem"}
    assert eu_parse(format_record(rec))["layer"] == 0       # the first line is unchanged


def test_override_credentials_and_platform():
    rec = override_record(EU_LAYER, {"username": "bob", "password": "pw", "platform": "linux/arm64"})
    assert (rec.username, rec.password, rec.platform) == ("bob", "pw", "linux/arm64/v8")
    assert eu_parse(format_record(rec))["cred"] == ("bob", "pw")
    rec2 = override_record(rec, {"password_file": "/run/secret"})   # a file: no secret kept in the record
    assert rec2.password is None and dict(rec2.options) == {"password_file": "/run/secret", "username": "bob"}
    rec3 = override_record(rec2, {"insecure": "no", "cache": "none"})
    assert "insecure" not in dict(rec3.options) and "cache" not in dict(rec3.options)


def test_override_refusals():
    with pytest.raises(UsageError, match="local file"):
        override_record(LocalRecord("/a.erofs"), {"insecure": ""})
    with pytest.raises(UsageError, match="cannot be given to --reattach"):
        override_record(EU_LAYER, {"layer": "1"})
    with pytest.raises(UsageError, match="need oci.username"):
        override_record(EU_LAYER, {"password": "x"})
    with pytest.raises(UsageError, match="unknown option"):
        override_record(EU_LAYER, {"insecur": ""})
    assert override_record(EU_LAYER, {}) is EU_LAYER


# ---- the device's size on reattach -------------------------------------------------------------
def test_reattach_size():
    eu_size = (2**63 - 1) >> 9 << 9          # EROFSMOUNT_NBD_DISK_SIZE (mount/main.c), in bytes
    assert eu_size == 9223372036854775296
    assert reattach_size(0, eu_size, 4739072) == eu_size
    assert reattach_size(0, 4739072, 4739072) == 4739072
    assert reattach_size(0, 0, 4096) == 4096
    with pytest.raises(ErofsMountError, match="not the image"):
        reattach_size(0, 4096, 8192)


# ---- TARINDEX_OCI_BLOB: a layer mounted with oci.tarindex=/oci.zinfo= ---------------------------
def test_erofs_utils_tarindex_record_parses():
    """mount/main.c: "TARINDEX_OCI_BLOB %s %s %s %s %s %s\n" (ref, platform, digest, cred or "",
    tarindex, zinfo or ""), read back by splitting on single spaces with empty fields kept."""
    rec = parse_record(f"TARINDEX_OCI_BLOB reg.io/app:v1 linux/amd64 {BLOB}  /var/lib/idx.erofs /var/lib/l.zinfo\n")
    assert isinstance(rec, OciNativeBlobRecord) and rec.digest == BLOB and rec.username is None
    assert dict(rec.options) == {"tarindex": "/var/lib/idx.erofs", "zinfo": "/var/lib/l.zinfo"}
    rec = parse_record(f"TARINDEX_OCI_BLOB reg.io/app:v1 linux/amd64 {BLOB} {CRED} /idx.erofs \n")
    assert (rec.username, rec.password) == ("alice", "s3cret pass") and dict(rec.options) == {"tarindex": "/idx.erofs"}
    with pytest.raises(ErofsMountError):
        parse_record(f"TARINDEX_OCI_BLOB reg.io/app:v1 linux/amd64 {BLOB}\n")


def test_our_tarindex_record_is_erofs_utils_form():
    rec = OciNativeBlobRecord("127.0.0.1:5000/app:v1", "linux/amd64", BLOB,
                              options=(("insecure", "1"), ("tarindex", "/i.erofs"), ("zinfo", "/z.zinfo")))
    text = format_record(rec)
    first, rest = text.split("\n", 1)
    assert first == f"TARINDEX_OCI_BLOB 127.0.0.1:5000/app:v1 linux/amd64 {BLOB}  /i.erofs /z.zinfo"
    assert rest == "insecure=1\n"
    assert parse_record(text) == OciNativeBlobRecord("127.0.0.1:5000/app:v1", "linux/amd64", BLOB,
                                                     options=(("insecure", "1"), ("tarindex", "/i.erofs"),
                                                              ("zinfo", "/z.zinfo")))
