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
from ..httpblob import HttpBlobClient, Budget, read_error_body, make_ssl_context
from .options import S3Location, S3Options, endpoint_parts, object_url, use_path_style
from .signing import S3Auth, S3Credentials, S3Signer

log = logging.getLogger("erofs_mount.sources.s3")


def etag_of(resp: httpx.Response) -> str:
    """The answer's ETag without quotes (and without a weak validator's ``W/``), or ""."""
    return (resp.headers.get("etag") or "").strip().removeprefix("W/").strip('"')


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
        self._url = self._object_url()
        bucket_path = "" if path_style else f"/{loc.bucket}"   # SigV2 signs /BUCKET/KEY whatever the URL

        def auth_path(url: httpx.URL) -> str:
            return bucket_path + url.raw_path.split(b"?")[0].decode()

        self.auth = S3Auth(S3Signer(creds, region, options.sig, auth_path), self.base_url)

    def _object_url(self) -> httpx.URL:
        return httpx.URL(object_url(self.endpoint, self.loc, path_style=self.path_style, version_id=self.version_id))

    def _changed(self, detail: str) -> ObjectChangedError:
        """The pinned object is gone: one log line, and the error (EIO) for the read."""
        msg = f"{self.loc}: the object changed since it was mounted ({detail}): not served"
        log.error("%s", msg)
        return ObjectChangedError(msg)

    # -- HttpBlobClient hooks --------------------------------------------------------------
    def blob_url(self, key: str) -> httpx.URL:
        return self._url

    def blob_headers(self, key: str) -> dict[str, str]:
        return {"If-Match": f'"{self.etag}"'} if self.etag else {}

    def check_blob(self, resp: httpx.Response, key: str, body: bytes = b"") -> None:
        code, message = error_code(body)
        status = resp.status_code
        said = f"HTTP {status}" + (f" {code}" if code else "")
        if status == 412:
            raise self._changed(f"ETag \"{self.etag}\" pinned; {said}")
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
        etag = etag_of(resp)
        if self.etag and etag and etag != self.etag:
            raise self._changed(f"ETag \"{self.etag}\" pinned, \"{etag}\" served")
        version = resp.headers.get("x-amz-version-id")
        if self.version_id and version and version != self.version_id:
            raise self._changed(f"version {self.version_id} pinned, {version} served")

    def unexpected(self, resp: httpx.Response, what: str, body: bytes = b"") -> ObjectStoreError:
        code, message = error_code(body)
        return ObjectStoreError(f"{self.loc}: {what}: unexpected HTTP {resp.status_code}"
                                + (f" {code}: {message}" if code else ""))

    # -- pinning ---------------------------------------------------------------------------
    async def pin(self) -> int:
        """Ask for byte 0; pin ETag and version; return the object's size."""
        url = self._url

        async def attempt(_budget: Budget) -> int:
            req = self.http.build_request("GET", url, headers={"Range": "bytes=0-0", "Accept-Encoding": "identity",
                                                               **self.blob_headers("")})
            resp = await self.http.send(req, auth=self.auth, stream=True)
            self.counters["requests"] += 1
            try:
                if resp.status_code not in (200, 206):
                    body = await read_error_body(resp)
                    self.check_blob(resp, "", body)
                    raise self.unexpected(resp, "first byte", body)
                self.check_body(resp, "")
                header = "content-range" if resp.status_code == 206 else "content-length"
                pattern = r"bytes 0-0/(\d+)" if resp.status_code == 206 else r"(\d+)"   # a 200: the Range ignored
                m = re.fullmatch(pattern, resp.headers.get(header, "").strip())
                if not m:
                    raise ObjectStoreError(f"{self.loc}: HTTP {resp.status_code} with a bad {header} "
                                           f"{resp.headers.get(header)!r}: the object's size is unknown")
                etag = etag_of(resp)
                if not etag:
                    raise ObjectStoreError(f"{self.loc}: the server sends no ETag: the object cannot be pinned")
            finally:
                await resp.aclose()   # a 200's body (the whole object) is not read
            self.etag = self.etag or etag
            if not self.version_id and resp.headers.get("x-amz-version-id"):   # from now on that version
                self.version_id = resp.headers["x-amz-version-id"]
                self._url = self._object_url()
            return int(m.group(1))

        return await self._with_retries("first byte", attempt)
