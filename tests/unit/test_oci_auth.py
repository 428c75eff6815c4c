import base64
import json

import pytest

from erofs_mount.errors import AuthError, RegistryError
from erofs_mount.sources.oci import auth as a
from erofs_mount.sources.oci.reference import parse_reference


def test_parse_challenges():
    ch = a.parse_www_authenticate(['Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull"'])
    assert ch == [a.Challenge("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                                         "scope": "repository:library/nginx:pull"})]
    ch = a.parse_www_authenticate(['Basic realm="test"', 'Bearer realm="r",error="invalid_token"'])
    assert [c.scheme for c in ch] == ["basic", "bearer"] and ch[1].params["error"] == "invalid_token"
    assert a.pick_challenge(ch).scheme == "bearer"
    ch = a.parse_www_authenticate(['Basic realm="a\\"b", charset=UTF-8, Bearer realm=x'])
    assert ch[0].params == {"realm": 'a"b', "charset": "UTF-8"} and ch[1].realm == "x"
    assert a.parse_www_authenticate([""]) == [] and a.pick_challenge([]) is None


def test_token_response_and_cache():
    tok = a.parse_token_response(json.dumps({"token": "t", "expires_in": 300}).encode(), now=100.0)
    assert tok.value == "t" and tok.expires_at == 100 + 300 - a.TOKEN_MARGIN
    tok2 = a.parse_token_response(json.dumps({"access_token": "u"}).encode(), now=0.0)
    assert tok2.value == "u" and tok2.expires_at == a.TOKEN_DEFAULT_TTL - a.TOKEN_MARGIN
    short = a.parse_token_response(json.dumps({"token": "s", "expires_in": 4}).encode(), now=0.0)
    assert 0 < short.expires_at <= 4
    for body in (b"x", b"{}", b'{"token": ""}'):
        with pytest.raises(RegistryError):
            a.parse_token_response(body, 0.0)
    cache = a.TokenCache()
    cache.put(("r", "s", "sc"), tok)
    assert cache.get(("r", "s", "sc"), 101.0) is tok
    assert cache.get(("r", "s", "sc"), tok.expires_at) is None  # expired: dropped
    cache.put("k", tok)
    cache.invalidate("k", tok2)  # someone else's token: keep
    assert cache.get("k", 0) is tok
    cache.invalidate("k", tok)
    assert cache.get("k", 0) is None


def b64(s):
    return base64.b64encode(s.encode()).decode()


def test_docker_config_lookup():
    ref = parse_reference("127.0.0.1:5000/team/app")
    doc = {"auths": {"https://127.0.0.1:5000": {"auth": b64("u:p:w")}, "other:1": {"auth": b64("x:y")}}}
    creds = a.lookup_docker_config(doc, ref, "config.json")
    assert (creds.username, creds.password) == ("u", "p:w") and "p:w" not in repr(creds)
    assert creds.basic_header() == "Basic " + b64("u:p:w")
    doc = {"credsStore": "store", "auths": {"127.0.0.1:5000": {}}}
    assert a.lookup_docker_config(doc, ref, "c") == a.HelperLookup("store", "127.0.0.1:5000", "c credsStore")
    doc = {"credsStore": "store", "credHelpers": {"127.0.0.1:5000": "helper"}}
    assert a.lookup_docker_config(doc, ref, "c").helper == "helper"
    assert a.lookup_docker_config({"auths": {"elsewhere": {"auth": b64("a:b")}}}, ref, "c") is None
    hub = parse_reference("nginx")
    doc = {"auths": {"https://index.docker.io/v1/": {"auth": b64("h:p")}}}
    assert a.lookup_docker_config(doc, hub, "c").username == "h"
    assert a.lookup_docker_config({"credsStore": "s"}, hub, "c").server_url == "https://index.docker.io/v1/"
    with pytest.raises(AuthError, match="base64"):
        a.lookup_docker_config({"auths": {"127.0.0.1:5000": {"auth": "!!!"}}}, ref, "c")
    with pytest.raises(AuthError):
        a.lookup_docker_config({"auths": {"127.0.0.1:5000": {"auth": b64("nocolon")}}}, ref, "c")


def test_auth_json_lookup():
    ref = parse_reference("reg.example:5000/team/app")
    doc = {"auths": {"reg.example:5000": {"auth": b64("host:1")}, "reg.example:5000/team": {"auth": b64("ns:2")}}}
    assert a.lookup_auth_json(doc, ref, "auth.json").username == "ns"
    assert a.lookup_auth_json({"auths": {"reg.example:5000": {"auth": b64("host:1")}}}, ref, "j").username == "host"
    assert a.lookup_auth_json({"auths": {"https://reg.example:5000": {"auth": b64("s:1")}}}, ref, "j").username == "s"
    assert a.lookup_auth_json({"auths": {}}, ref, "j") is None
    assert a.lookup_auth_json({"auths": {"docker.io/library": {"auth": b64("d:1")}}}, parse_reference("nginx"), "j").username == "d"


def test_helper_output():
    c = a.parse_helper_output(json.dumps({"ServerURL": "x", "Username": "u", "Secret": "s"}).encode(), "h")
    assert (c.username, c.password, c.origin) == ("u", "s", "docker-credential-h")
    assert a.parse_helper_output(json.dumps({"Username": "<token>", "Secret": "r"}).encode(), "h").identity_token
    assert a.parse_helper_output(b"{}", "h") is None
    with pytest.raises(AuthError, match="docker-credential-h"):
        a.parse_helper_output(b"credentials not found", "h")
