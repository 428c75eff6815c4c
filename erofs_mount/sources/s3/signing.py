"""S3 credentials and request signing, with botocore.

Why botocore (and not a signer of our own, nor aiobotocore): its credential chain is the one
every AWS tool resolves — environment, ``~/.aws/credentials`` and ``~/.aws/config`` profiles,
``credential_process``, SSO, assume-role, the container (ECS/EKS) and instance (IMDSv2) metadata
endpoints — with refreshing temporary credentials, and its signers (``S3SigV4Auth``, and
``HmacV1Auth`` for erofs-utils' ``s3.sig=2``) are AWS's own.  Only the signing is taken: the
requests go through our httpx client on trio (aiobotocore is asyncio-only), so S3 objects share the
registry blobs' cache, read-ahead and retries (``sources/httpblob.py``).

Credentials, first found wins: ``s3.anonymous`` (nothing signed); ``s3.passwd_file`` (erofs-utils:
one ``ACCESS:SECRET`` line; s3fs's ``BUCKET:ACCESS:SECRET`` lines too); botocore's chain (with
``s3.profile`` as the profile).  None found: requests go unsigned (a public bucket), as erofs-utils
does without keys.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

import httpx
import trio

from ...errors import AuthError, UsageError
from ..httpblob import origin
from .options import S3Location, S3Options

log = logging.getLogger("erofs_mount.sources.s3")

_SIGNED = ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256", "X-Amz-Security-Token", "Date")


@dataclass
class S3Credentials:
    creds: object          # botocore Credentials (maybe refreshable)
    origin: str            # "s3.passwd_file", "env", "shared-credentials-file", "iam-role", …

    @property
    def static_pair(self) -> tuple[str, str] | None:
        """(access key, secret) when they are long-lived keys a recovery record may keep (as
        erofs-utils does): from s3.passwd_file or AWS_ACCESS_KEY_ID without a session token."""
        if self.origin not in ("s3.passwd_file", "env", "recovery record"):
            return None
        f = self.creds.get_frozen_credentials()
        return None if f.token else (f.access_key, f.secret_key)


def read_passwd_file(path: str, bucket: str) -> tuple[str, str]:
    """(access key, secret) from an s3fs-style file: ``ACCESS:SECRET`` (erofs-utils
    lib/remotes/s3.c ``s3erofs_parse_s3fs_passwd`` reads this form), or ``BUCKET:ACCESS:SECRET``
    lines, the one for *bucket* first."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"s3.passwd_file={path}: not a regular file")
        if st.st_size > 64 << 10:
            raise UsageError(f"s3.passwd_file={path}: too large for a key file")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise UsageError(f"s3.passwd_file={path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"s3.passwd_file={path}: not text") from None
    if st.st_mode & 0o077:
        log.warning("s3.passwd_file=%s can be read by group or others", path)
    generic = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) == 2 and generic is None:
            generic = (parts[0], parts[1])
        elif len(parts) == 3 and parts[0] == bucket:
            generic = (parts[1], parts[2])
            break
    if generic is None or not generic[0] or not generic[1]:
        raise UsageError(f"s3.passwd_file={path}: no ACCESS:SECRET line (for bucket {bucket})")
    return generic


def resolve(options: S3Options, loc: S3Location, pair: tuple[str, str] | None = None) -> tuple[S3Credentials | None, str]:
    """(credentials or None, region) — sync, may do I/O (config files, metadata endpoints): run it
    in a worker thread.  *pair*: keys a recovery record kept."""
    import botocore.credentials
    import botocore.exceptions
    import botocore.session

    try:
        session = botocore.session.Session(profile=options.profile)
        region = options.region or session.get_config_variable("region") or "us-east-1"
    except botocore.exceptions.ProfileNotFound:
        raise UsageError(f"s3.profile={options.profile}: no such profile in the AWS config files") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise UsageError(f"AWS configuration: {exc}") from None
    if options.anonymous:
        return None, region
    if pair is not None:
        return S3Credentials(botocore.credentials.Credentials(*pair), "recovery record"), region
    if options.passwd_file:
        ak, sk = read_passwd_file(options.passwd_file, loc.bucket)
        return S3Credentials(botocore.credentials.Credentials(ak, sk), "s3.passwd_file"), region
    creds = None
    # botocore's CredentialResolver.load_credentials, one provider at a time: an error names the provider
    for provider in session.get_component("credential_provider").providers:
        what = getattr(provider, "METHOD", type(provider).__name__)
        try:
            creds = provider.load()
        except botocore.exceptions.BotoCoreError as exc:   # a broken profile, a failing credential_process
            raise AuthError(f"{loc}: AWS credentials: {exc}") from None
        except OSError as exc:   # a credential_process that cannot be run at all
            raise AuthError(f"{loc}: AWS credentials: {what}: {exc.filename or 'credential_process'}: "
                            f"{exc.strerror or exc}") from None
        except (KeyError, TypeError, ValueError) as exc:   # a metadata answer that holds no credentials
            raise AuthError(f"{loc}: AWS credentials: {what}: the answer holds no credentials "
                            f"({type(exc).__name__}: {exc})") from None
        if creds is not None:
            break
    if creds is None:
        return None, region
    return S3Credentials(creds, getattr(creds, "method", None) or "AWS configuration"), region


class S3Signer:
    """Signs one request: SigV4 (``AWS4-HMAC-SHA256``, S3 flavour) or SigV2 (``AWS ak:sig``)."""

    def __init__(self, creds: S3Credentials | None, region: str, sig: int, auth_path) -> None:
        self.creds = creds
        self.region = region
        self.sig = sig
        self._auth_path = auth_path   # url -> "/BUCKET/KEY" (SigV2's canonical resource)
        from botocore.auth import HmacV1Auth, S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        self._aws_request, self._v4, self._v2 = AWSRequest, S3SigV4Auth, HmacV1Auth

    async def frozen(self):
        c = self.creds.creds
        need = getattr(c, "refresh_needed", None)
        if need is not None and need():   # temporary credentials about to expire: renewed (may do I/O)
            return await trio.to_thread.run_sync(c.get_frozen_credentials)
        return c.get_frozen_credentials()

    async def sign(self, request: httpx.Request) -> None:
        if self.creds is None:
            return
        frozen = await self.frozen()
        aws = self._aws_request(method=request.method, url=str(request.url),
                         headers={k: v for k, v in request.headers.items()
                                  if k.lower() not in ("host", "connection", "user-agent")})
        if self.sig == 4:
            self._v4(frozen, "s3", self.region).add_auth(aws)
        else:
            aws.auth_path = self._auth_path(request.url)
            self._v2(frozen).add_auth(aws)
        for name in _SIGNED:
            value = aws.headers.get(name)
            if value is not None:
                request.headers[name] = value


class S3Auth(httpx.Auth):
    """Signs requests to the endpoint's own origin (never a redirect target)."""

    def __init__(self, signer: S3Signer, base_url: httpx.URL) -> None:
        self.signer = signer
        self.base_origin = origin(base_url)

    async def async_auth_flow(self, request: httpx.Request):
        if origin(request.url) == self.base_origin:
            await self.signer.sign(request)
        yield request

    def sync_auth_flow(self, request):  # pragma: no cover - the client is async only
        raise RuntimeError("S3Auth is async only")
