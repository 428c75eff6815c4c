"""Fixtures of the S3 tests: one moto_server per module (signature checking on), the corpus images
put in a bucket."""

from __future__ import annotations

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
