"""Authentication against real registries: htpasswd Basic, Bearer tokens (pyjwt issuer), TLS, redirects,
credential files, helpers and environment."""

import pytest
import trio

from erofs_mount.errors import AuthError, NetworkError, UsageError
from erofs_mount.sources.oci.blob import open_oci_source
from erofs_mount.sources.oci.options import OciOptions

from tests.oci._servers import USERS, docker_auth, env_with, write_credential_helper, write_json

pytestmark = pytest.mark.trio
KiB = 1024


async def check(ref, world, env, options, blob="A", layer=0):
    src = await open_oci_source(ref, options=options, layer=layer, env=env)
    try:
        assert src.digest == world.digests[blob]
        assert await src.read_at(4096, 10000) == world.blobs[blob][4096:14096]
        return src.stats()
    finally:
        await src.aclose()


# -- Basic (htpasswd) ---------------------------------------------------------------------
async def test_basic_password_file(world, basic_registry, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("wonderland\n")
    opts = OciOptions(insecure=True, username="alice", password_file=str(pw))
    await check(world.ref("team/app:v1", basic_registry), world, env_with(), opts)


async def test_basic_password_on_argv_warns(world, basic_registry, caplog):
    opts = OciOptions(insecure=True, username="alice", password="wonderland")
    await check(world.ref("team/app:v1", basic_registry), world, env_with(), opts)
    assert any("command line" in r.message for r in caplog.records)


async def test_basic_environment(world, basic_registry):
    env = env_with(EROFS_MOUNT_USERNAME="alice", EROFS_MOUNT_PASSWORD="wonderland")
    await check(world.ref("team/app:v1", basic_registry), world, env, OciOptions(insecure=True))


async def test_basic_wrong_and_missing(world, basic_registry):
    ref = world.ref("team/app:v1", basic_registry)
    with pytest.raises(AuthError) as ei:
        await open_oci_source(ref, options=OciOptions(insecure=True, username="alice", password="nope"),
                              layer=0, env=env_with())
    msg = str(ei.value)
    assert basic_registry.host in msg and "refused" in msg and "\n" not in msg and "nope" not in msg
    assert ei.value.errno == 13
    with pytest.raises(AuthError, match="requires authentication"):
        await open_oci_source(ref, options=OciOptions(insecure=True), layer=0, env=env_with())


async def test_docker_config_auths(world, basic_registry, tmp_path):
    write_json(tmp_path / "docker" / "config.json",
               {"auths": {f"http://{basic_registry.host}": docker_auth("alice", USERS["alice"])}})
    env = env_with(DOCKER_CONFIG=tmp_path / "docker")
    await check(world.ref("team/app:v1", basic_registry), world, env, OciOptions(insecure=True))
    # ~/.docker/config.json when DOCKER_CONFIG is unset
    write_json(tmp_path / "home" / ".docker" / "config.json",
               {"auths": {basic_registry.host: docker_auth("alice", USERS["alice"])}})
    await check(world.ref("team/app:v1", basic_registry), world, env_with(HOME=tmp_path / "home"),
                OciOptions(insecure=True))


@pytest.mark.parametrize("kind", ["credsStore", "credHelpers"])
async def test_docker_credential_helper(world, basic_registry, tmp_path, kind):
    bindir = tmp_path / "bin"
    write_credential_helper(bindir, "erofstest", basic_registry.host, "alice", USERS["alice"])
    doc = {"credsStore": "erofstest"} if kind == "credsStore" else {"credHelpers": {basic_registry.host: "erofstest"}}
    write_json(tmp_path / "docker" / "config.json", doc)
    env = env_with(DOCKER_CONFIG=tmp_path / "docker")
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}"
    await check(world.ref("team/app:v1", basic_registry), world, env, OciOptions(insecure=True))
    assert (bindir / "erofstest.calls").read_text().split() == [basic_registry.host]


async def test_credential_helper_not_knowing(world, basic_registry, tmp_path):
    bindir = tmp_path / "bin"
    write_credential_helper(bindir, "erofstest", "elsewhere:1", "alice", USERS["alice"])
    write_json(tmp_path / "docker" / "config.json", {"credsStore": "erofstest"})
    env = env_with(DOCKER_CONFIG=tmp_path / "docker")
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}"
    with pytest.raises(AuthError, match="requires authentication"):
        await open_oci_source(world.ref("team/app:v1", basic_registry), options=OciOptions(insecure=True),
                              layer=0, env=env)


async def test_containers_auth_json(world, basic_registry, tmp_path):
    write_json(tmp_path / "auth.json", {"auths": {f"{basic_registry.host}/team": docker_auth("alice", USERS["alice"])}})
    await check(world.ref("team/app:v1", basic_registry), world,
                env_with(REGISTRY_AUTH_FILE=tmp_path / "auth.json"), OciOptions(insecure=True))
    write_json(tmp_path / "run" / "containers" / "auth.json",
               {"auths": {basic_registry.host: docker_auth("alice", USERS["alice"])}})
    await check(world.ref("team/app:v1", basic_registry), world,
                env_with(XDG_RUNTIME_DIR=tmp_path / "run"), OciOptions(insecure=True))


# -- Bearer tokens ------------------------------------------------------------------------
async def test_bearer_anonymous(world, token_anon):
    reg, issuer = token_anon
    n = len(issuer.issued)
    s = await check(world.ref("team/app:v1", reg), world, env_with(), OciOptions(insecure=True))
    assert s["token_requests"] == 1
    subject, scopes = issuer.issued[n]
    assert subject == "" and scopes == ["repository:team/app:pull"]


async def test_bearer_with_credentials(world, token_users):
    reg, issuer = token_users
    opts = OciOptions(insecure=True, username="bob", password="builder")
    await check(world.ref("team/app:v1", reg), world, env_with(), opts)
    assert issuer.issued[-1][0] == "bob"
    with pytest.raises(AuthError, match=f"registry {reg.host}.*refused the credentials from oci.password"):
        await open_oci_source(world.ref("team/app:v1", reg), layer=0, env=env_with(),
                              options=OciOptions(insecure=True, username="bob", password="wrong"))
    with pytest.raises(AuthError, match="refused anonymous access"):
        await open_oci_source(world.ref("team/app:v1", reg), layer=0, env=env_with(), options=OciOptions(insecure=True))


async def test_bearer_token_expiry_mid_read_401(world, token_factory):
    """Tokens die after 2 s at the registry but claim 300 s: the 401 refreshes them."""
    reg, issuer = token_factory("expire401", ttl=2, reported_ttl=300)
    opts = OciOptions(insecure=True, chunk_size=64 * KiB, readahead=0)
    src = await open_oci_source(world.ref("team/big:v1", reg), options=opts, env=env_with())
    try:
        big = world.blobs["big"]
        assert await src.read_at(1 << 20, 1000) == big[1 << 20:(1 << 20) + 1000]
        assert src.stats()["token_requests"] == 1
        await trio.sleep(2.5)
        assert await src.read_at(2 << 20, 1000) == big[2 << 20:(2 << 20) + 1000]
        assert src.stats()["token_requests"] == 2 and len(issuer.issued) == 2
    finally:
        await src.aclose()


async def test_bearer_token_proactive_refresh(world, token_factory):
    """expires_in says 2 s: the client gets a fresh token before using an expired one."""
    reg, issuer = token_factory("expire-soon", ttl=2)
    opts = OciOptions(insecure=True, chunk_size=64 * KiB, readahead=0)
    src = await open_oci_source(world.ref("team/big:v1", reg), options=opts, env=env_with())
    try:
        await trio.sleep(2.2)
        assert await src.read_at(3 << 20, 10) == world.blobs["big"][3 << 20:(3 << 20) + 10]
        assert len(issuer.issued) == 2
    finally:
        await src.aclose()


async def test_concurrent_401s_share_one_token(world, token_anon):
    reg, issuer = token_anon
    opts = OciOptions(insecure=True, chunk_size=64 * KiB, readahead=0)
    src = await open_oci_source(world.ref("team/big:v1", reg), options=opts, env=env_with())
    try:
        assert src.stats()["token_requests"] == 1
        async with trio.open_nursery() as n:
            for k in range(8):
                n.start_soon(src.read_at, k * 300 * KiB, 10)
        assert src.stats()["token_requests"] == 1
    finally:
        await src.aclose()


# -- TLS -----------------------------------------------------------------------------------
async def test_tls_with_cafile(world, tls_registry):
    reg, ca = tls_registry
    await check(world.ref("team/app:v1", reg), world, env_with(), OciOptions(cafile=str(ca)))


async def test_tls_untrusted(world, tls_registry):
    reg, ca = tls_registry
    with trio.fail_after(30):
        with pytest.raises(NetworkError, match="not trusted.*oci.cafile"):
            await open_oci_source(world.ref("team/app:v1", reg), layer=0, env=env_with(), options=OciOptions())
    with pytest.raises(UsageError, match="oci.cafile"):
        await open_oci_source(world.ref("team/app:v1", reg), layer=0, env=env_with(),
                              options=OciOptions(cafile=str(world.root / "missing.pem")))


async def test_plain_http_refused_for_docker_hub():
    with pytest.raises(UsageError, match="Docker Hub"):
        await open_oci_source("library/nginx", options=OciOptions(insecure=True))


# -- cross-origin redirects ------------------------------------------------------------------
async def test_redirect_no_authorization_forwarded(world, redirect_registry):
    reg, host = redirect_registry
    n0 = len(host.requests)
    opts = OciOptions(insecure=True, username="alice", password="wonderland", chunk_size=64 * KiB, readahead=0)
    src = await open_oci_source(world.ref("team/app:v1", reg), options=opts, layer=0, env=env_with())
    try:
        a = world.blobs["A"]
        for off in (0, 1 << 20, 2 << 20, 3 << 20):
            assert await src.read_at(off, 5000) == a[off:off + 5000]
        seen = host.requests[n0:]
        assert len(seen) == 4 and all(auth is None for *_, auth in seen)
        assert all(rng is not None for _, _, rng, _ in seen)
        s = src.stats()
        assert s["redirects"] == 1  # the target is reused: 3 reads went straight to the blob host
    finally:
        await src.aclose()
