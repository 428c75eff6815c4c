"""Fixtures of the S3 tests: one moto_server per module (signature checking on), the corpus images
put in a bucket."""

from __future__ import annotations

import os

import pytest

from tests import corpuslib

from ._moto import S3Server, start_s3

BUCKET = "images"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    srv = start_s3(tmp_path_factory.mktemp("moto"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def s3_open(tmp_path_factory):
    """A server that checks no signature (unsigned requests: a public bucket; SigV2, which moto's
    checker does not know)."""
    srv = start_s3(tmp_path_factory.mktemp("moto-open"), auth=False)
    try:
        yield srv
    finally:
        srv.stop()


def put_image(srv: S3Server, name: str, key: str | None = None, *, bucket: str = BUCKET,
              versioned: bool = False) -> tuple[str, bytes]:
    """Upload corpus image *name*; (its s3:// source, its bytes)."""
    data = corpuslib.image(name).path.read_bytes()
    key = key or f"corpus/{name}.erofs"
    srv.put(bucket, key, data, versioned=versioned)
    return f"s3://{bucket}/{key}", data


def clean_aws_env(tmp_path, monkeypatch) -> None:
    """No AWS variable of this machine, AWS config files of the test's own (none: no ~/.aws is
    read), the instance metadata service off (a test that wants it turns it on)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def signed(monkeypatch):
    """The headers (lower-case names) of every request the S3 client signed, or left unsigned, as sent."""
    from erofs_mount.sources.s3.signing import S3Signer

    seen: list[dict] = []
    original = S3Signer.sign

    async def sign(self, request):
        await original(self, request)
        seen.append({k.lower(): v for k, v in request.headers.items()})

    monkeypatch.setattr(S3Signer, "sign", sign)
    return seen
