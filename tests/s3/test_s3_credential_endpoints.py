"""botocore's credential chain through its metadata endpoints, end to end against a real S3 server
(moto_server, signatures checked): the container endpoint (ECS/EKS,
``AWS_CONTAINER_CREDENTIALS_FULL_URI``) and the instance metadata service (IMDSv2,
``AWS_EC2_METADATA_SERVICE_ENDPOINT``), each a small stdlib HTTP server on 127.0.0.1 speaking the
endpoint's protocol; temporary credentials refreshed before they expire; endpoints that fail.

The temporary credentials are real ones of the moto server: moto refuses an IAM user's long-lived
``AKIA…`` key with any ``X-Amz-Security-Token`` (403 InvalidToken), and accepts an ``ASIA…`` key
only with the session token its STS issued with it.  So the module's server has a role allowed
``s3:*`` whose ``AssumeRole`` the IAM user may call, and each endpoint answer is a fresh
``sts:AssumeRole`` (a new key, secret and token every time) signed with the user's key.
"""

from __future__ import annotations

import datetime
import http.server
import json
import threading
import urllib.request

import pytest
import trio

from erofs_mount.errors import AuthError, ErofsMountError, SourceError
from erofs_mount.sources.s3.options import S3Options
from erofs_mount.sources.s3.source import open_s3_source

from ._moto import REGION, S3Server, start_s3
from .conftest import clean_aws_env, put_image

pytestmark = pytest.mark.trio
KiB = 1 << 10
LIMIT = 8   # seconds: a bound on every test's waits (each takes well under it)
ROLE = "erofs-reader"


# -- the S3 server: a role the IAM user may assume -------------------------------------------------

class Minter:
    """Fresh temporary credentials of the server's role (``sts:AssumeRole`` with the user's key)."""

    def __init__(self, srv: S3Server, role_arn: str) -> None:
        import botocore.session

        self.role_arn = role_arn
        self.sts = botocore.session.get_session().create_client(
            "sts", endpoint_url=srv.url, region_name=REGION,
            aws_access_key_id=srv.access_key, aws_secret_access_key=srv.secret_key)
        self.minted: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, expires_in: float = 3600) -> dict:
        """The JSON fields both endpoints answer with (Expiration *expires_in* seconds ahead)."""
        with self._lock:
            c = self.sts.assume_role(RoleArn=self.role_arn, RoleSessionName=f"s{len(self.minted)}")["Credentials"]
            expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=expires_in)
            creds = {"AccessKeyId": c["AccessKeyId"], "SecretAccessKey": c["SecretAccessKey"],
                     "Token": c["SessionToken"], "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}
            self.minted.append(creds)
            return creds

    def keys(self) -> set[str]:
        with self._lock:
            return {c["AccessKeyId"] for c in self.minted}


@pytest.fixture(scope="module")
def s3sts(tmp_path_factory):
    """(the server, its Minter): set up with authentication off, then authentication on."""
    import botocore.session

    srv = start_s3(tmp_path_factory.mktemp("moto-sts"), auth=False)
    try:
        iam = botocore.session.get_session().create_client(
            "iam", endpoint_url=srv.url, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
        role = iam.create_role(RoleName=ROLE, AssumeRolePolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"},
                                                     "Action": "sts:AssumeRole"}]}))["Role"]
        iam.put_role_policy(RoleName=ROLE, PolicyName="s3all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        iam.put_user_policy(UserName="tester", PolicyName="assume", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                     "Resource": role["Arn"]}]}))
        req = urllib.request.Request(srv.url + "/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()
        yield srv, Minter(srv, role["Arn"])
    finally:
        srv.stop()


# -- metadata endpoints ---------------------------------------------------------------------------

class Endpoint:
    """An HTTP server on 127.0.0.1 (a thread) answering ``answer(method, path, headers)`` ->
    (status, body); ``.hits``: (method, path, lower-cased headers) of every request."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.hits: list[tuple[str, str, dict]] = []
        self._lock = threading.Lock()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                if int(headers.get("content-length") or 0):
                    self.rfile.read(int(headers["content-length"]))
                with endpoint._lock:
                    endpoint.hits.append((self.command, self.path, headers))
                try:
                    status, body = endpoint.answer(self.command, self.path, headers)
                except Exception as exc:   # the test's own bug: visible in the answer
                    status, body = 599, repr(exc).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = _serve

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="metadata-endpoint", daemon=True)
        self.thread.start()

    def requests(self, method: str | None = None, path: str | None = None) -> list[tuple[str, str, dict]]:
        with self._lock:
            return [h for h in self.hits if (method is None or h[0] == method) and (path is None or h[1] == path)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def serve():
    """``serve(answer)`` starts an Endpoint; every one is shut down after the test."""
    started: list[Endpoint] = []

    def start(answer) -> Endpoint:
        ep = Endpoint(answer)
        started.append(ep)
        return ep

    yield start
    for ep in started:
        ep.close()
    assert not any(ep.thread.is_alive() for ep in started)


def container_answer(mint, *, token: str | None = None, expires_in: float = 3600, state: dict | None = None):
    """The container endpoint at /creds: credentials JSON, or 401 without the expected
    Authorization header; ``state["fail"]`` (when set): that (status, body) instead."""
    def answer(method, path, headers):
        if state and state.get("fail"):
            return state["fail"]
        if method != "GET" or path != "/creds":
            return 404, b'{"message": "not found"}'
        if token is not None and headers.get("authorization") != token:
            return 401, b'{"message": "bad authorization token"}'
        return 200, json.dumps(mint(expires_in)).encode()

    return answer


IMDS_TOKEN = "AQAEAimds-session-token=="
CREDS_PATH = "/latest/meta-data/iam/security-credentials/"


def imds_answer(mint, *, expires_in: float = 3600):
    """IMDSv2: PUT /latest/api/token (with a TTL header) gives a token every GET must carry."""
    def answer(method, path, headers):
        if method == "PUT":
            if path != "/latest/api/token":
                return 405, b""
            if not headers.get("x-aws-ec2-metadata-token-ttl-seconds", "").isdigit():
                return 400, b"missing X-aws-ec2-metadata-token-ttl-seconds"
            return 200, IMDS_TOKEN.encode()
        if headers.get("x-aws-ec2-metadata-token") != IMDS_TOKEN:
            return 401, b""
        if path == CREDS_PATH:
            return 200, ROLE.encode()
        if path == CREDS_PATH + ROLE:
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            return 200, json.dumps({"Code": "Success", "LastUpdated": now, "Type": "AWS-HMAC",
                                    **mint(expires_in)}).encode()
        return 404, b""

    return answer


# -- the environment ------------------------------------------------------------------------------

@pytest.fixture
def aws_env(tmp_path, monkeypatch):
    """No AWS variable of this machine, AWS config files of the test's own (none: no ~/.aws is
    read), the instance metadata service off (a test that wants it turns it on)."""
    clean_aws_env(tmp_path, monkeypatch)
    return monkeypatch


def s3opts(srv, **extra: str | None) -> S3Options:
    return S3Options.from_mount_options({"s3.endpoint": srv.url, **extra})


def uncached(srv) -> S3Options:
    """Small chunks, a small memory cache, no read-ahead: reads far apart each go to the server."""
    return s3opts(srv, **{"s3.chunk_size": "4K", "s3.memory_limit": "16K", "s3.readahead": "0"})


async def read_all(src, piece: int = 256 * KiB) -> bytes:
    out = bytearray()
    for off in range(0, src.size, piece):
        out += await src.read_at(off, piece)
    return bytes(out)


def key_of(headers: dict) -> str:
    """The access key a SigV4 Authorization header names."""
    auth = headers["authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential="), auth
    return auth.removeprefix("AWS4-HMAC-SHA256 Credential=").split("/", 1)[0]


# -- moto and session tokens ----------------------------------------------------------------------

async def test_moto_session_token_rules(s3sts):
    """What the tests rely on: an IAM user's key with any session token is refused; STS's
    temporary key works with its own token only."""
    srv, mint = s3sts
    source, data = put_image(srv, "lz4", "sts/lz4.erofs")
    bucket, _, key = source.removeprefix("s3://").partition("/")
    import botocore.exceptions
    import botocore.session

    def get(ak, sk, token):
        c = botocore.session.get_session().create_client(
            "s3", endpoint_url=srv.url, region_name=REGION, aws_access_key_id=ak, aws_secret_access_key=sk,
            aws_session_token=token)
        return c.get_object(Bucket=bucket, Key=key, Range="bytes=0-3")["Body"].read()

    with pytest.raises(botocore.exceptions.ClientError, match="InvalidToken"):
        get(srv.access_key, srv.secret_key, "any-token")
    creds = mint()
    assert creds["AccessKeyId"].startswith("ASIA")
    assert get(creds["AccessKeyId"], creds["SecretAccessKey"], creds["Token"]) == data[:4]
    with pytest.raises(botocore.exceptions.ClientError, match="InvalidToken"):
        get(creds["AccessKeyId"], creds["SecretAccessKey"], "not-its-token")
    with pytest.raises(botocore.exceptions.ClientError, match="InvalidAccessKeyId"):
        get(creds["AccessKeyId"], creds["SecretAccessKey"], None)


# -- the container endpoint (ECS/EKS) ------------------------------------------------------------

async def test_container_endpoint(s3sts, aws_env, serve, signed):
    srv, mint = s3sts
    source, data = put_image(srv, "lz4", "container/lz4.erofs")
    ep = serve(container_answer(mint, token="Bearer pod-identity-token"))
    aws_env.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", ep.url + "/creds")
    aws_env.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "Bearer pod-identity-token")
    with trio.fail_after(LIMIT):
        src = await open_s3_source(source, options=s3opts(srv))
        try:
            assert src.credentials_origin == "container-role"
            assert src.static_credentials is None     # temporary: never kept in a recovery record
            assert await read_all(src) == data
        finally:
            await src.aclose()
    hits = ep.requests()
    assert hits and all(h[:2] == ("GET", "/creds") for h in hits)
    assert all(h[2].get("authorization") == "Bearer pod-identity-token" for h in hits)
    # an hour ahead: fetched once, every request signed with that key and its session token
    assert len(hits) == 1 and len(mint.minted) >= 1
    creds = mint.minted[-1]
    assert signed
    for headers in signed:
        assert key_of(headers) == creds["AccessKeyId"]
        assert headers["x-amz-security-token"] == creds["Token"]


async def test_container_endpoint_wrong_authorization_token(s3sts, aws_env, serve):
    srv, mint = s3sts
    source, _ = put_image(srv, "lz4", "container/lz4.erofs")
    ep = serve(container_answer(mint, token="Bearer right"))
    aws_env.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", ep.url + "/creds")
    aws_env.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "Bearer wrong")
    with trio.fail_after(LIMIT):
        with pytest.raises(AuthError, match="container-role") as info:
            await open_s3_source(source, options=s3opts(srv))
    assert str(info.value).startswith(source) and "401" in str(info.value)
    assert ep.requests("GET", "/creds")
    assert all(h[2].get("authorization") == "Bearer wrong" for h in ep.hits)


# -- the instance metadata service (IMDSv2) ------------------------------------------------------

async def test_instance_metadata_v2(s3sts, aws_env, serve, signed):
    srv, mint = s3sts
    source, data = put_image(srv, "lz4", "imds/lz4.erofs")
    ep = serve(imds_answer(mint))
    aws_env.delenv("AWS_EC2_METADATA_DISABLED")
    aws_env.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", ep.url + "/")
    with trio.fail_after(LIMIT):
        src = await open_s3_source(source, options=s3opts(srv))
        try:
            assert src.credentials_origin == "iam-role"
            assert src.static_credentials is None
            assert await read_all(src) == data
        finally:
            await src.aclose()
    puts = ep.requests("PUT", "/latest/api/token")
    assert puts and all(int(h[2]["x-aws-ec2-metadata-token-ttl-seconds"]) > 0 for h in puts)
    assert ep.requests("GET", CREDS_PATH) and ep.requests("GET", CREDS_PATH + ROLE)
    # IMDSv2 only: every GET carried the session token
    assert all(h[2].get("x-aws-ec2-metadata-token") == IMDS_TOKEN for h in ep.requests("GET"))
    creds = mint.minted[-1]
    assert signed and all(key_of(h) == creds["AccessKeyId"] and h["x-amz-security-token"] == creds["Token"]
                          for h in signed)


# -- refreshing ----------------------------------------------------------------------------------

async def test_expiring_credentials_are_refreshed(s3sts, aws_env, serve, signed, tmp_path):
    """Credentials 5 minutes from expiry (inside botocore's advisory and mandatory refresh windows)
    are fetched again before each request: every read still succeeds, with fresh keys.  (The
    container endpoint: botocore stretches an IMDS expiry this near to 12-20 minutes, its
    "static stability", so IMDS refreshes would be random here.)  The token file is read again
    at each fetch (EKS Pod Identity rotates it)."""
    srv, mint = s3sts
    source, data = put_image(srv, "lz4", "refresh/lz4.erofs")
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text("token-1")
    ep = serve(container_answer(mint, expires_in=300))
    aws_env.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", ep.url + "/creds")
    aws_env.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token_file))
    offsets = [64 * KiB, 300 * KiB, 700 * KiB, 64 * KiB, 1100 * KiB, len(data) - 4 * KiB]
    with trio.fail_after(LIMIT):
        src = await open_s3_source(source, options=uncached(srv))
        try:
            assert src.credentials_origin == "container-role"
            at_open = len(ep.hits)
            token_file.write_text("token-2")
            for off in offsets:
                assert await src.read_at(off, 4 * KiB) == data[off:off + 4 * KiB]
            st = src.stats()
        finally:
            await src.aclose()
    assert st["failures"] == 0 and st["retries"] == 0
    hits = ep.requests("GET", "/creds")
    assert len(hits) == len(ep.hits) > at_open >= 1
    # one fetch at open, then one before every signed request
    assert st["requests"] >= len(offsets) + 1 and len(signed) == st["requests"]
    assert len(hits) >= len(signed)
    assert [h[2].get("authorization") for h in hits[:at_open]] == ["token-1"] * at_open
    assert hits[-1][2].get("authorization") == "token-2"
    used = [key_of(h) for h in signed]
    assert len(set(used)) > 1 and set(used) <= mint.keys()
    tokens = {c["AccessKeyId"]: c["Token"] for c in mint.minted}
    assert all(h["x-amz-security-token"] == tokens[key_of(h)] for h in signed)


async def test_failed_refresh_fails_one_read(s3sts, aws_env, serve):
    """The endpoint down when credentials must be refreshed: that read fails with a SourceError
    (botocore's error in its message), the next read after the endpoint is back succeeds."""
    srv, mint = s3sts
    source, data = put_image(srv, "lz4", "refresh/lz4.erofs")
    state: dict = {}
    ep = serve(container_answer(mint, expires_in=300, state=state))
    aws_env.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", ep.url + "/creds")
    with trio.fail_after(LIMIT):
        src = await open_s3_source(source, options=uncached(srv))
        try:
            assert await src.read_at(64 * KiB, 4 * KiB) == data[64 * KiB:68 * KiB]
            state["fail"] = (500, b'{"message": "internal error"}')
            with pytest.raises(SourceError, match="container-role") as info:
                await src.read_at(500 * KiB, 4 * KiB)
            assert str(info.value).count("\n") == 0 and "500" in str(info.value)
            state.clear()
            assert await src.read_at(900 * KiB, 4 * KiB) == data[900 * KiB:904 * KiB]
            assert await src.read_at(500 * KiB, 4 * KiB) == data[500 * KiB:504 * KiB]
        finally:
            await src.aclose()


# -- endpoints that fail at open -------------------------------------------------------------------

@pytest.mark.parametrize("status,body", [(500, b"Internal Server Error"), (200, b"<html>not json</html>")],
                         ids=["http-500", "not-json"])
async def test_container_endpoint_failing(s3sts, aws_env, serve, status, body):
    srv, mint = s3sts
    source, _ = put_image(srv, "lz4", "container/lz4.erofs")
    ep = serve(lambda method, path, headers: (status, body))
    aws_env.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", ep.url + "/creds")
    with trio.fail_after(LIMIT):    # botocore tries 3 times, 1 s apart
        with pytest.raises(AuthError) as info:
            await open_s3_source(source, options=s3opts(srv))
    msg = str(info.value)
    assert msg.startswith(f"{source}: AWS credentials: ") and "container-role" in msg and "\n" not in msg
    assert ("500" in msg) if status == 500 else ("JSON" in msg)
    assert ep.requests("GET", "/creds")


@pytest.mark.parametrize("body", [
    {"code": "AccessDeniedException", "message": "the pod's service account may not assume the role"},
    ["not", "an", "object"],
    {"AccessKeyId": "ASIAX", "SecretAccessKey": "s", "Token": "t", "Expiration": "next tuesday"},
], ids=["error-document", "json-array", "bad-expiration"])
async def test_container_endpoint_json_without_credentials(s3sts, aws_env, serve, body):
    srv, mint = s3sts
    source, _ = put_image(srv, "lz4", "container/lz4.erofs")
    ep = serve(lambda method, path, headers: (200, json.dumps(body).encode()))
    aws_env.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", ep.url + "/creds")
    error: Exception | None = None
    with trio.fail_after(LIMIT):
        try:
            src = await open_s3_source(source, options=s3opts(srv))
        except Exception as exc:
            error = exc
        else:
            await src.aclose()
    assert ep.requests("GET", "/creds")
    assert isinstance(error, ErofsMountError), f"{type(error).__name__}: {error} escaped open_s3_source"
    assert "container-role" in str(error) and str(error).startswith(source)


@pytest.mark.parametrize("failure", ["http-500", "not-json", "no-token"])
async def test_instance_metadata_failing(s3sts, aws_env, serve, failure):
    """botocore takes a failing instance metadata service for "no credentials here" (it is the
    chain's last resort): the request goes unsigned and S3 refuses it."""
    srv, mint = s3sts
    source, _ = put_image(srv, "lz4", "imds/lz4.erofs")
    good = imds_answer(mint)

    def answer(method, path, headers):
        if failure == "http-500":
            return 500, b"Internal Server Error"
        if failure == "no-token" and method == "PUT":
            return 500, b""     # no IMDSv2 token: botocore's IMDSv1 GETs are refused (401)
        if failure == "not-json" and path == CREDS_PATH + ROLE:
            return 200, b"{{not json"
        return good(method, path, headers)

    ep = serve(answer)
    aws_env.delenv("AWS_EC2_METADATA_DISABLED")
    aws_env.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", ep.url)
    with trio.fail_after(LIMIT):
        with pytest.raises(AuthError, match="unsigned request") as info:
            await open_s3_source(source, options=s3opts(srv))
    assert "no AWS credentials found" in str(info.value) and "HTTP 403" in str(info.value)
    assert ep.requests("PUT", "/latest/api/token")
    if failure == "not-json":
        assert ep.requests("GET", CREDS_PATH + ROLE)
