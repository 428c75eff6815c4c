"""Where registry credentials come from (I/O: files, environment, helper processes).

Order (first match wins):
1. ``-o oci.username=`` with ``oci.password=`` (accepted for compatibility with
   erofs-utils, with a warning: argv is visible to every user) or
   ``oci.password_file=`` (first line, trailing newline stripped);
2. ``EROFS_MOUNT_USERNAME`` / ``EROFS_MOUNT_PASSWORD``;
3. ``$REGISTRY_AUTH_FILE`` (containers-auth.json format);
4. Docker's ``config.json`` in ``$DOCKER_CONFIG`` or ``~/.docker``:
   ``credHelpers`` → ``credsStore`` → ``auths`` (a helper is the executable
   ``docker-credential-<name>`` on PATH: ``get``, server URL on stdin, JSON out);
5. ``$XDG_RUNTIME_DIR/containers/auth.json``.
Nothing found → anonymous.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import trio

from ...errors import AuthError, UsageError
from .auth import Credentials, HelperLookup, lookup_auth_json, lookup_docker_config, parse_helper_output
from .options import OciOptions
from .reference import Reference

log = logging.getLogger("erofs_mount.sources.oci")
HELPER_TIMEOUT = 15.0


def _read_json(path: str) -> object | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None


def read_password_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except OSError as exc:
        raise UsageError(f"oci.password_file={path}: {exc.strerror}") from None
    return line.rstrip("\r\n")


def docker_config_path(env: dict) -> str | None:
    if env.get("DOCKER_CONFIG"):
        return os.path.join(env["DOCKER_CONFIG"], "config.json")
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".docker", "config.json") if home else None


async def run_helper(lookup: HelperLookup, env: dict) -> Credentials | None:
    exe = f"docker-credential-{lookup.helper}"
    path = shutil.which(exe, path=env.get("PATH", os.defpath))
    if path is None:
        log.warning("%s names %s, which is not on PATH", lookup.origin, exe)
        return None
    try:
        with trio.fail_after(HELPER_TIMEOUT):
            proc = await trio.run_process(
                [path, "get"], stdin=lookup.server_url.encode(), capture_stdout=True,
                capture_stderr=True, check=False, env=env,
            )
    except trio.TooSlowError:
        raise AuthError(f"{exe} get: no answer within {HELPER_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        msg = (proc.stdout or proc.stderr).decode(errors="replace").strip()
        if "credentials not found" in msg.lower():
            return None
        raise AuthError(f"{exe} get failed (status {proc.returncode}): {msg[:200]}")
    return parse_helper_output(proc.stdout, lookup.helper)


async def find_credentials(ref: Reference, options: OciOptions, env: dict | None = None) -> Credentials | None:
    env = dict(os.environ if env is None else env)
    if options.username:
        if options.password_file is not None:
            return Credentials(options.username, read_password_file(options.password_file), "oci.password_file")
        if options.password is not None:
            log.warning("oci.password given on the command line: any local user can read it (use oci.password_file)")
            return Credentials(options.username, options.password, "oci.password")
        return Credentials(options.username, "", "oci.username")
    if env.get("EROFS_MOUNT_USERNAME"):
        return Credentials(env["EROFS_MOUNT_USERNAME"], env.get("EROFS_MOUNT_PASSWORD", ""), "environment")
    if env.get("REGISTRY_AUTH_FILE"):
        path = env["REGISTRY_AUTH_FILE"]
        creds = lookup_auth_json(_read_json(path), ref, path)
        if creds is not None:
            return creds
    path = docker_config_path(env)
    if path:
        found = lookup_docker_config(_read_json(path), ref, path)
        if isinstance(found, HelperLookup):
            creds = await run_helper(found, env)
            if creds is not None:
                return creds
        elif found is not None:
            return found
    if env.get("XDG_RUNTIME_DIR"):
        path = os.path.join(env["XDG_RUNTIME_DIR"], "containers", "auth.json")
        creds = lookup_auth_json(_read_json(path), ref, path)
        if creds is not None:
            return creds
    return None


__all__ = ["find_credentials", "run_helper", "read_password_file"]
