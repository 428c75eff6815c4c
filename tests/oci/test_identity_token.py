"""Docker's identity tokens (``identitytoken`` in config.json, or a credential helper answering the user
``<token>``): an OAuth2 refresh token exchanged at the token service's POST endpoint
(distribution docs/spec/auth/oauth.md), against a real registry and token issuer."""

import base64

import pytest

from erofs_mount.errors import AuthError
from erofs_mount.sources.oci.blob import open_oci_source
from erofs_mount.sources.oci.options import OciOptions

from tests.oci._servers import env_with, write_credential_helper, write_json

pytestmark = pytest.mark.trio


def identity_entry(token: str) -> dict:
    # what `docker login` writes for an identity token: no password, the user is "<token>"
    return {"auth": base64.b64encode(b"<token>:").decode(), "identitytoken": token}


async def read_some(world, ref, env):
    src = await open_oci_source(ref, options=OciOptions(insecure=True), layer=0, env=env)
    try:
        assert src.digest == world.digests["A"]
        assert await src.read_at(4096, 10000) == world.blobs["A"][4096:14096]
    finally:
        await src.aclose()


async def test_identity_token_from_config_json(world, token_factory, tmp_path):
    reg, issuer = token_factory("oauth", anonymous=False, users={}, refresh_tokens={"rt-123": "carol"})
    write_json(tmp_path / "docker" / "config.json", {"auths": {reg.host: identity_entry("rt-123")}})
    await read_some(world, world.ref("team/app:v1", reg), env_with(DOCKER_CONFIG=tmp_path / "docker"))
    assert issuer.oauth_issued and issuer.oauth_issued[-1] == ("carol", ["repository:team/app:pull"])
    assert issuer.issued == []          # never the GET endpoint with the refresh token as a password


async def test_identity_token_from_credential_helper(world, token_factory, tmp_path):
    reg, issuer = token_factory("oauth-helper", anonymous=False, users={}, refresh_tokens={"rt-456": "dave"})
    bindir = tmp_path / "bin"
    write_credential_helper(bindir, "erofsoauth", reg.host, "<token>", "rt-456")
    write_json(tmp_path / "docker" / "config.json", {"credHelpers": {reg.host: "erofsoauth"}})
    env = env_with(DOCKER_CONFIG=tmp_path / "docker")
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}"
    await read_some(world, world.ref("team/app:v1", reg), env)
    assert issuer.oauth_issued[-1][0] == "dave"


async def test_revoked_identity_token_is_one_clear_error(world, token_factory, tmp_path):
    reg, issuer = token_factory("oauth-bad", anonymous=False, users={}, refresh_tokens={"rt-good": "erin"})
    write_json(tmp_path / "docker" / "config.json", {"auths": {reg.host: identity_entry("rt-revoked")}})
    with pytest.raises(AuthError, match=f"registry {reg.host}: token service .* refused the credentials from"):
        await open_oci_source(world.ref("team/app:v1", reg), options=OciOptions(insecure=True), layer=0,
                              env=env_with(DOCKER_CONFIG=tmp_path / "docker"))
    assert issuer.oauth_issued == [] and issuer.issued == []
