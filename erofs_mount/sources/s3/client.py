"""S3Client: one S3 object, pinned, read with signed Range GETs (``httpblob.HttpBlobClient``).

``pin()`` asks for byte 0 once (a GET, not a HEAD: an error answer carries S3's error code) and
pins the object: its size (``Content-Range``), its ``ETag`` and, in a versioned bucket, its
``x-amz-version-id``.  Every later GET carries ``If-Match: ETAG`` (and ``?versionId=`` when there
is one), so an object replaced under a mounted image answers 412 — an EIO for that read and one
log line — instead of bytes of another object.  A 200/206 whose ETag is not the pinned one (a
server that ignores If-Match) is refused the same way: a reader never gets the bytes of two
objects mixed.
"""

from __future__ import annotations

import logging
import re
import ssl
from xml.etree import ElementTree

import httpx

from ...errors import AuthError, NotFoundError, ObjectChangedError, ObjectStoreError
from ..httpblob import HttpBlobClient, _Budget, read_error_body, make_ssl_context
from .options import S3Location, S3Options, endpoint_parts, object_url, use_path_style
from .signing import S3Auth, S3Credentials, S3Signer

log = logging.getLogger("erofs_mount.sources.s3")


def _body(resp: httpx.Response) -> bytes:
    """What ``httpblob.read_error_body`` read of an error answer, or the body when it was read."""
    body = getattr(resp, "error_body", None)
    if body is None:
        body = resp.content if hasattr(resp, "_content") else b""
    return body


def error_code(body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 error document (``<Error><Code>…``), empty when there is none."""
    if not body or b"<Error" not in body[:512]:
        return "", ""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "", ""
    return (root.findtext("Code") or "").strip(), (root.findtext("Message") or "").strip()


class S3Client(HttpBlobClient):
    blob_noun = "object"
    cafile_hint = "give the CA with -o s3.cafile="

    def __init__(self, loc: S3Location, options: S3Options, *, endpoint: str,
                 creds: S3Credentials | None, region: str) -> None:
        scheme, host, _prefix = endpoint_parts(endpoint)
        t = options.transfer
        verify: ssl.SSLContext | bool = True
        if scheme == "https":
            verify = make_ssl_context(t.cafile, what="s3.cafile")
        path_style = use_path_style(options.path_style, scheme, host, loc.bucket)
        base = f"{scheme}://{host}" if path_style else f"{scheme}://{loc.bucket}.{host}"
        super().__init__(t, base_url=base, verify=verify)
        self.loc = loc
        self.s3 = options
        self.endpoint = endpoint
        self.path_style = path_style
        self.label = str(loc)
        self.creds = creds
        self.region = region
        self.etag: str | None = options.etag
        self.version_id: str | None = options.version_id or loc.version_id
        signer = S3Signer(creds, region, options.sig, lambda url: f"/{loc.bucket}{url.raw_path.split(b'?')[0].decode()}"
                          if not path_style else url.raw_path.split(b"?")[0].decode())
        self.auth = S3Auth(signer, self.base_url)

    # -- HttpBlobClient hooks --------------------------------------------------------------
    def blob_url(self, key: str) -> httpx.URL:
        return httpx.URL(object_url(self.endpoint, self.loc, path_style=self.path_style, version_id=self.version_id))

    def blob_headers(self, key: str) -> dict[str, str]:
        return {"If-Match": f'"{self.etag}"'} if self.etag else {}

    def check_blob(self, resp: httpx.Response, key: str) -> None:
        code, message = error_code(_body(resp))
        status = resp.status_code
        said = f"HTTP {status}" + (f" {code}" if code else "")
        if status == 412:
            msg = (f"{self.loc}: the object changed since it was mounted (ETag \"{self.etag}\" pinned; "
                   f"{said}): not served")
            log.error("%s", msg)
            raise ObjectChangedError(msg)
        if status in (401, 403):
            if code in ("RequestTimeTooSkewed",):
                raise ObjectStoreError(f"{self.loc}: {said}: this machine's clock is off ({message})")
            who = f"the credentials from {self.creds.origin}" if self.creds else "an unsigned request (no AWS credentials found)"
            raise AuthError(f"{self.loc}: access denied to {who} ({said}{': ' + message if message else ''})")
        self._raise_for_retry(resp)
        if status == 404:
            what = {"NoSuchBucket": f"no bucket {self.loc.bucket!r}", "NoSuchVersion": f"no version {self.version_id}"}
            raise NotFoundError(f"{self.loc}: {what.get(code, 'no such object')} ({said})")
        if status == 416:   # only asked of an empty object
            raise ObjectStoreError(f"{self.loc}: the object is empty ({said})")

    def check_body(self, resp: httpx.Response, key: str) -> None:
        etag = (resp.headers.get("etag") or "").strip().removeprefix("W/").strip('"')
        if self.etag and etag and etag != self.etag:
            msg = f"{self.loc}: the object changed since it was mounted (ETag \"{self.etag}\" pinned, \"{etag}\" served): not served"
            log.error("%s", msg)
            raise ObjectChangedError(msg)
        version = resp.headers.get("x-amz-version-id")
        if self.version_id and version and version != self.version_id:
            raise ObjectChangedError(f"{self.loc}: version {version} served, {self.version_id} pinned: not served")

    def unexpected(self, resp: httpx.Response, what: str) -> ObjectStoreError:
        code, message = error_code(_body(resp))
        return ObjectStoreError(f"{self.loc}: {what}: unexpected HTTP {resp.status_code}"
                                + (f" {code}: {message}" if code else ""))

    # -- pinning ---------------------------------------------------------------------------
    async def pin(self) -> int:
        """Ask for byte 0; pin ETag and version; return the object's size."""
        url = self.blob_url("")

        async def attempt(_budget: _Budget) -> int:
            req = self.http.build_request("GET", url, headers={"Range": "bytes=0-0", "Accept-Encoding": "identity",
                                                               **self.blob_headers("")})
            resp = await self.http.send(req, auth=self.auth, stream=True)
            self.counters["requests"] += 1
            try:
                if resp.status_code not in (200, 206):
                    await read_error_body(resp)
                    self.check_blob(resp, "")
                    raise self.unexpected(resp, "first byte")
                self.check_body(resp, "")
                header = "content-range" if resp.status_code == 206 else "content-length"
                pattern = r"bytes 0-0/(\d+)" if resp.status_code == 206 else r"(\d+)"   # a 200: the Range ignored
                m = re.fullmatch(pattern, resp.headers.get(header, "").strip())
                if not m:
                    raise ObjectStoreError(f"{self.loc}: HTTP {resp.status_code} with a bad {header} "
                                           f"{resp.headers.get(header)!r}: the object's size is unknown")
                etag = (resp.headers.get("etag") or "").strip().removeprefix("W/").strip('"')
                if not etag:
                    raise ObjectStoreError(f"{self.loc}: the server sends no ETag: the object cannot be pinned")
            finally:
                await resp.aclose()   # a 200's body (the whole object) is not read
            self.etag = self.etag or etag
            self.version_id = self.version_id or resp.headers.get("x-amz-version-id") or None
            return int(m.group(1))

        return await self._with_retries("first byte", attempt)
