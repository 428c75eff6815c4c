"""OCI recovery records: what a reattach needs, and secrets only when nothing else can supply them."""

from __future__ import annotations

from erofs_mount.backends.nbd.recovery import OciNativeBlobRecord, format_record, parse_record
from erofs_mount.backends.nbd.source import oci_options_from_record, record_for_oci
from erofs_mount.sources.oci.options import OciOptions

DIGEST = "sha256:" + "cd" * 32


def test_password_from_command_line_is_kept_as_erofs_utils_b64():
    rec = record_for_oci("127.0.0.1:5000/app:v1", "linux/amd64", DIGEST,
                         OciOptions(username="u", password="p w", insecure=True))
    text = format_record(rec)
    assert text.split("\n")[0].endswith(f" {DIGEST} dTpwIHc=")
    assert "insecure=1" in text
    back = oci_options_from_record(parse_record(text))
    assert (back.username, back.password, back.insecure) == ("u", "p w", True)


def test_password_file_is_remembered_by_path_not_content(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("secret")
    rec = record_for_oci("reg/app:v1", "linux/arm64/v8", DIGEST,
                         OciOptions(username="u", password_file=str(pw), cafile="/etc/ca.pem"))
    text = format_record(rec)
    assert "secret" not in text
    assert rec.username is None and rec.password is None
    back = oci_options_from_record(parse_record(text))
    assert (back.username, back.password_file, back.cafile, back.password) == ("u", str(pw), "/etc/ca.pem", None)


def test_no_credentials_no_token_and_digest_pinned():
    rec = record_for_oci("reg/app:latest", "linux/amd64", DIGEST, OciOptions())
    assert format_record(rec) == f"OCI_NATIVE_BLOB reg/app:latest linux/amd64 {DIGEST}\n"
    assert isinstance(parse_record(format_record(rec)), OciNativeBlobRecord)


def test_mirror_options_survive_a_reattach():
    """oci.mirrors=no and where the configuration files are: a reattach reads the same files again."""
    rec = record_for_oci("reg/app:v1", "linux/amd64", DIGEST,
                         OciOptions(mirrors=False, registries_conf="/etc/r.conf", hosts_dir="/etc/h"))
    back = oci_options_from_record(parse_record(format_record(rec)))
    assert (back.mirrors, back.registries_conf, back.hosts_dir) == (False, "/etc/r.conf", "/etc/h")
    assert oci_options_from_record(parse_record(format_record(
        record_for_oci("reg/app:v1", "linux/amd64", DIGEST, OciOptions())))).mirrors is True
