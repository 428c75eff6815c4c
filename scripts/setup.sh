#!/usr/bin/env bash
# Install everything erofs-mount needs on Debian 12 (as root): apt packages, the
# venv in .venv and the Python packages.  Idempotent and quick when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(
  # build + FUSE mode
  gcc pkg-config python3-venv python3-dev fuse3 libfuse3-dev
  # real components the tests and benchmarks drive
  erofs-utils attr acl util-linux squashfs-tools squashfuse
  user-mode-linux iproute2 docker-registry apache2-utils openssl skopeo
  # dm-verity: veritysetup is the tests' oracle for the tree format; dmsetup to inspect NBD-mode verity devices
  cryptsetup-bin dmsetup
)

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages (run as root to install): ${missing[*]}" >&2
  else
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # keep package postinst scripts from starting system services (docker-registry)
    had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
    [ $had_policy = 1 ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ $had_policy = 1 ] || rm -f /usr/sbin/policy-rc.d
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python packages into .venv"
  if ! .venv/bin/python -m pip install -q -e '.[test]' >.venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    exit 1
  fi
  touch "$stamp"
fi
