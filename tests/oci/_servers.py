"""Real servers for the OCI tests: Debian's docker-registry, a token issuer, a blob host, TLS, htpasswd.

Facts from ../shared/docs/testing.md §1.  Everything listens on 127.0.0.1 with port 0.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REGISTRY_BIN = shutil.which("docker-registry")
USERS = {"alice": "wonderland"}  # the htpasswd users of the Basic-auth registries
START_TIMEOUT = 20.0


# -- the registry process ---------------------------------------------------------------
@dataclass
class Registry:
    proc: subprocess.Popen
    port: int
    workdir: Path
    scheme: str = "http"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_registry(workdir: Path, storage: Path, *, auth: dict | None = None, tls: tuple | None = None,
                   middleware: dict | None = None, access_log: bool = False, proxy: dict | None = None,
                   port: int = 0) -> Registry:
    """*access_log*: the combined-format access log goes to ``workdir/registry.log`` (blob_bytes
    reads it); *proxy*: a pull-through cache of ``proxy["remoteurl"]``; *port*: a fixed one (a
    registry restarted where clients expect it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_cfg: dict = {"addr": f"127.0.0.1:{port}", "secret": "any-test-secret"}
    if tls:
        http_cfg["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    cfg: dict = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": not access_log}, "formatter": "text"},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True},
                    "cache": {"blobdescriptor": "inmemory"}, "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": http_cfg,
        "health": {"storagedriver": {"enabled": False}},
    }
    if auth:
        cfg["auth"] = auth
    if middleware:
        cfg["middleware"] = middleware
    if proxy:
        cfg["proxy"] = proxy
    (workdir / "config.json").write_text(json.dumps(cfg))
    log = open(workdir / "registry.log", "wb")
    proc = subprocess.Popen(
        ["setpriv", "--pdeathsig", "TERM", REGISTRY_BIN, "serve", str(workdir / "config.json")],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT
    port = None
    while time.monotonic() < deadline:
        text = (workdir / "registry.log").read_text(errors="replace")
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        if m:
            port = int(m.group(1))
            break
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {text[-2000:]}")
        time.sleep(0.02)
    if port is None:
        proc.kill()
        raise RuntimeError("docker-registry did not start")
    reg = Registry(proc, port, workdir, "https" if tls else "http")
    verify = str(tls[2]) if tls else False
    with httpx.Client(verify=_ctx(verify), timeout=5) as c:
        while time.monotonic() < deadline:
            try:
                if c.get(f"{reg.url}/v2/").status_code in (200, 401):
                    return reg
            except httpx.TransportError:
                pass
            time.sleep(0.02)
    reg.stop()
    raise RuntimeError("docker-registry not ready")


_ACCESS = re.compile(rb'"(GET|HEAD) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


def blob_bytes(reg: Registry, digest: str | None = None) -> int:
    """Blob body bytes the registry served (its access log: ``start_registry(access_log=True)``)."""
    total = 0
    for m in _ACCESS.finditer((reg.workdir / "registry.log").read_bytes()):
        path = m.group(2).decode()
        if m.group(1) == b"GET" and "/blobs/" in path and (digest is None or path.endswith(digest)) \
                and m.group(4) != b"-":
            total += int(m.group(4))
    return total


def _ctx(verify):
    import ssl

    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


# -- pushing content (OCI distribution spec) ------------------------------------------
def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Pusher:
    def __init__(self, base_url: str) -> None:
        self.base = base_url
        self.http = httpx.Client(timeout=60)

    def blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        if self.http.head(f"{self.base}/v2/{repo}/blobs/{digest}").status_code == 200:
            return digest
        r = self.http.post(f"{self.base}/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, r.text
        loc = httpx.URL(self.base).join(r.headers["location"])
        # httpx 0.28: params= would replace the query (and lose _state)
        r = self.http.put(loc.copy_add_param("digest", digest), content=data,
                          headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        return digest

    def manifest(self, repo: str, ref: str, doc: dict) -> tuple[str, int]:
        body = json.dumps(doc).encode()
        r = self.http.put(f"{self.base}/v2/{repo}/manifests/{ref}", content=body,
                          headers={"Content-Type": doc["mediaType"]})
        assert r.status_code == 201, r.text
        return sha256(body), len(body)

    def image(self, repo: str, ref: str, layers: list[tuple], *, docker: bool = False,
              config: dict | None = None) -> tuple[str, int]:
        cfg = json.dumps(config or {"architecture": "amd64", "os": "linux"}).encode()
        cfg_digest = self.blob(repo, cfg)
        doc = {
            "schemaVersion": 2,
            "mediaType": ("application/vnd.docker.distribution.manifest.v2+json" if docker
                          else "application/vnd.oci.image.manifest.v1+json"),
            "config": {"mediaType": ("application/vnd.docker.container.image.v1+json" if docker
                                     else "application/vnd.oci.image.config.v1+json"),
                       "digest": cfg_digest, "size": len(cfg)},
            # a layer is (media type, bytes) or (media type, bytes, annotations)
            "layers": [{"mediaType": layer[0], "digest": self.blob(repo, layer[1]), "size": len(layer[1]),
                        **({"annotations": layer[2]} if len(layer) > 2 else {})} for layer in layers],
        }
        return self.manifest(repo, ref, doc)

    def index(self, repo: str, ref: str, entries: list[tuple[dict, str, int]], *, docker: bool = False) -> tuple[str, int]:
        mt = "application/vnd.docker.distribution.manifest.v2+json" if docker else "application/vnd.oci.image.manifest.v1+json"
        doc = {
            "schemaVersion": 2,
            "mediaType": ("application/vnd.docker.distribution.manifest.list.v2+json" if docker
                          else "application/vnd.oci.image.index.v1+json"),
            "manifests": [{"mediaType": mt, "digest": d, "size": n, "platform": p} for p, d, n in entries],
        }
        return self.manifest(repo, ref, doc)

    def close(self) -> None:
        self.http.close()


# -- htpasswd and TLS -------------------------------------------------------------------
def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    import bcrypt

    path.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                            for u, p in users.items()))
    return path


def make_tls(d: Path) -> tuple[Path, Path, Path]:
    """(server cert, server key, CA cert) made with openssl: SAN localhost, 127.0.0.1, ::1."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=30, cwd=d)  # noqa: E731
    run("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=erofs-mount test CA")
    run("openssl", "req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
                               "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf")
    return d / "srv.pem", d / "srv.key", d / "ca.pem"


# -- small stdlib HTTP servers ------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    disable_nagle_algorithm = True  # else every reply costs ~40 ms (delayed ACK)
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def start(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        return self.server_address[1]


def libtrust_kid(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


@dataclass
class TokenIssuer:
    """A registry token service (distribution docs/spec/auth/token.md) on 127.0.0.1."""

    workdir: Path
    users: dict = field(default_factory=dict)
    anonymous: bool = True
    ttl: float = 300.0  # real lifetime of a token at the registry
    reported_ttl: int | None = None  # what expires_in says (None: ttl)
    service: str = "erofs-mount-test"
    issuer: str = "erofs-mount-test-issuer"
    issued: list = field(default_factory=list)
    refresh_tokens: dict = field(default_factory=dict)  # OAuth2 refresh token -> subject (docker's identitytoken)
    oauth_issued: list = field(default_factory=list)    # tokens from the refresh-token grant (POST)

    def start(self) -> "TokenIssuer":
        import jwt  # noqa: F401 (fail early if absent)
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.workdir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-issuer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2)).sign(key, hashes.SHA256()))
        self.cert_path = self.workdir / "token-cert.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        self._kid = libtrust_kid(key.public_key())
        issuer = self

        class H(_Handler):
            def do_GET(self):
                issuer._handle(self)

            def do_POST(self):
                issuer._handle_post(self)

        self.server = _Server(("127.0.0.1", 0), H).start()
        return self

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/token"

    def registry_auth(self) -> dict:
        return {"token": {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                          "rootcertbundle": str(self.cert_path)}}

    def _handle_post(self, h: _Handler) -> None:
        """The OAuth2 token endpoint (distribution docs/spec/auth/oauth.md): refresh-token grant only."""
        url = httpx.URL(h.path)
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)).decode()
        form = httpx.QueryParams(body)
        if url.path != "/token" or form.get("grant_type") != "refresh_token":
            return h.reply(400, b'{"error":"unsupported_grant_type"}', {"Content-Type": "application/json"})
        subject = self.refresh_tokens.get(form.get("refresh_token", ""))
        if subject is None or not form.get("client_id"):
            return h.reply(401, b'{"error":"invalid_grant"}', {"Content-Type": "application/json"})
        self._issue(h, subject, form.get_list("scope"), form.get("service") or self.service, oauth=True)

    def _handle(self, h: _Handler) -> None:
        url = httpx.URL(h.path)
        if url.path != "/token":
            return h.reply(404)
        subject = ""
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(user) != pw:
                return h.reply(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"Content-Type": "application/json"})
            subject = user
        elif not self.anonymous:
            return h.reply(401, b"{}", {"WWW-Authenticate": 'Basic realm="token"'})
        self._issue(h, subject, url.params.get_list("scope"), url.params.get("service", self.service))

    def _issue(self, h: _Handler, subject: str, scopes: list, service: str, *, oauth: bool = False) -> None:
        import jwt

        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) >= 3 and parts[0] == "repository":
                access.append({"type": "repository", "name": ":".join(parts[1:-1]), "actions": ["pull"]})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": service,
                  # the registry allows 60 s of leeway: make the token die `ttl` seconds from now
                  "exp": now + int(self.ttl) - 60, "nbf": now - 5, "iat": now, "jti": uuid.uuid4().hex,
                  "access": access}
        token = jwt.encode(claims, self._key_pem, algorithm="ES256", headers={"kid": self._kid})
        (self.oauth_issued if oauth else self.issued).append((subject, scopes))
        reported = int(self.ttl) if self.reported_ttl is None else self.reported_ttl
        doc = {"access_token": token, "expires_in": reported,
               "issued_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        if not oauth:
            doc["token"] = token     # the GET endpoint answers both names; OAuth2 only access_token
        body = json.dumps(doc).encode()
        h.reply(200, body, {"Content-Type": "application/json"})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BlobHost:
    """Serves the registry's storage files with Range, like S3 behind the redirect middleware.

    Any request carrying an Authorization header is rejected (400), as S3 does
    for a pre-signed URL with a second credential."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list = []
        host = self

        class H(_Handler):
            def do_GET(self):
                host._handle(self)

            do_HEAD = do_GET

        self.server = _Server(("127.0.0.1", 0), H).start()

    @property
    def baseurl(self) -> str:
        return f"http://localhost:{self.server.port}"

    def _handle(self, h: _Handler) -> None:
        path = httpx.URL(h.path).path
        self.requests.append((h.command, path, h.headers.get("Range"), h.headers.get("Authorization")))
        if h.headers.get("Authorization"):
            return h.reply(400, b"<Error>InvalidArgument: only one auth mechanism allowed</Error>")
        f = (self.root / path.lstrip("/")).resolve()
        if not str(f).startswith(str(self.root.resolve())) or not f.is_file():
            return h.reply(404)
        data = f.read_bytes()
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
        if m:
            a = int(m.group(1))
            b = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            if a >= len(data):
                return h.reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            return h.reply(206, data[a:b + 1], {"Content-Range": f"bytes {a}-{b}/{len(data)}"})
        h.reply(200, data)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def docker_auth(user: str, pw: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()}


def write_credential_helper(bindir: Path, name: str, server: str, user: str, secret: str) -> Path:
    """A real `docker-credential-<name>` executable speaking the helper protocol (get)."""
    bindir.mkdir(parents=True, exist_ok=True)
    exe = bindir / f"docker-credential-{name}"
    out = json.dumps({"ServerURL": server, "Username": user, "Secret": secret})
    exe.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = get ] || {{ echo "unsupported: $1" >&2; exit 1; }}\n'
        "read -r url\n"
        f'echo "$url" >> "{bindir}/{name}.calls"\n'
        f'if [ "$url" = "{server}" ]; then\n'
        f"  printf '%s\\n' '{out}'\n"
        "else\n  echo 'credentials not found in native keychain'; exit 1\nfi\n"
    )
    exe.chmod(0o755)
    return exe


def env_with(**kw) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR",
                        "EROFS_MOUNT_USERNAME", "EROFS_MOUNT_PASSWORD")}
    env["HOME"] = kw.pop("HOME", "/nonexistent")
    env.update({k: str(v) for k, v in kw.items()})
    return env


def write_json(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path
