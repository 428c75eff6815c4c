"""A real S3 server for tests: moto's ``moto_server`` on 127.0.0.1, with signature checking on.

``start_s3(root)`` runs it, creates an IAM user with an access key allowed ``s3:*``, then turns
authentication on (``/moto-api/reset-auth 0``): from then on every request needs a valid SigV4 (or
SigV2) signature of that key — a wrong secret gets 403 SignatureDoesNotMatch, an unknown key 403
InvalidAccessKeyId.  (moto does not check the payload hash, the clock or the region.)
``start_s3(root, auth=False)``: a server that checks nothing (unsigned requests, public objects).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

MOTO_BIN = shutil.which("moto_server", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    url: str
    proc: subprocess.Popen
    access_key: str
    secret_key: str
    log_path: str

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A botocore S3 client (the test's own uploads and replacements)."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.url, region_name=REGION,
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def put(self, bucket: str, key: str, data: bytes, *, versioned: bool = False) -> dict:
        c = self.client()
        try:
            c.create_bucket(Bucket=bucket)
            if versioned:
                c.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except c.exceptions.BucketAlreadyExists:
            pass
        return c.put_object(Bucket=bucket, Key=key, Body=data)

    def env(self, **extra: str) -> dict:
        """An environment whose AWS variables name this server's key (and nothing else of AWS)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                    "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                    "AWS_EC2_METADATA_DISABLED": "true", **extra})
        return env

    def passwd_file(self, path, text: str | None = None):
        """An s3.passwd_file at *path* (0600): *text*, else erofs-utils' ``ACCESS:SECRET`` of this server's key."""
        path.write_text(text if text is not None else f"{self.access_key}:{self.secret_key}\n")
        path.chmod(0o600)
        return path

    def requests_logged(self) -> list[str]:
        """The GET/HEAD lines werkzeug logged (colour codes, which it puts around non-200 answers, removed)."""
        import re

        with open(self.log_path, errors="replace") as f:
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in f]
        return [line for line in lines if '"GET ' in line or '"HEAD ' in line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_s3(root, *, auth: bool = True) -> S3Server:
    if MOTO_BIN is None:
        import pytest

        pytest.skip("moto_server is not installed (pip install 'moto[s3,iam]' flask flask-cors)")
    os.makedirs(root, exist_ok=True)
    port = _free_port()
    log_path = os.path.join(str(root), "moto.log")
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "TMPDIR": str(root)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([MOTO_BIN, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start: {open(log_path).read()[-2000:]}")
            time.sleep(0.1)
    try:
        return _set_up(url, proc, log_path, auth)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise


def _set_up(url: str, proc: subprocess.Popen, log_path: str, auth: bool) -> S3Server:
    """An IAM user with a key allowed s3:*; then (auth) signatures checked from now on."""
    import botocore.session

    iam = botocore.session.get_session().create_client(
        "iam", endpoint_url=url, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="tester")
    key = iam.create_access_key(UserName="tester")["AccessKey"]
    iam.put_user_policy(UserName="tester", PolicyName="s3all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    if auth:
        req = urllib.request.Request(url + "/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()
    return S3Server(url, proc, key["AccessKeyId"], key["SecretAccessKey"], log_path)
