#!/usr/bin/env bash
# `make run`: show the bundled demo image — mounted with FUSE when this machine can, else through the tools.
set -euo pipefail
cd "$(dirname "$0")/.."
E="$PWD/.venv/bin/erofs-mount"
img=demo/demo.erofs
mnt=${DEMO_MNT:-/tmp/erofs-mount-demo}

echo "== erofs-mount inspect $img"
"$E" inspect "$img"
echo

if [ -e /dev/fuse ] && .venv/bin/python -c "import erofs_mount.backends.fuse.lifecycle" 2>/dev/null; then
  mkdir -p "$mnt"
  if mountpoint -q "$mnt"; then "$E" -u "$mnt" || true; fi
  echo "== erofs-mount --mode fuse $img $mnt"
  "$E" --mode fuse "$img" "$mnt"
  echo
  echo "== ls -la $mnt $mnt/docs"
  ls -la "$mnt" "$mnt/docs"
  echo
  echo "== cat $mnt/README.txt"
  cat "$mnt/README.txt"
  echo
  echo "== getfattr -d $mnt/README.txt"
  getfattr -d "$mnt/README.txt" 2>/dev/null || true
  echo "== $mnt/bin/hello"
  "$mnt/bin/hello"
  echo
  echo "The demo image is mounted (read-only, FUSE) at $mnt."
  echo "Unmount it with:  $E -u $mnt"
else
  echo "(FUSE mode unavailable here: showing the image through the reader tools instead)"
  echo "== erofs-mount ls -l $img /docs"
  "$E" ls -l "$img" /docs
  echo
  echo "== erofs-mount cat $img /README.txt"
  "$E" cat "$img" /README.txt
  echo
  echo "== erofs-mount getfattr $img /README.txt"
  "$E" getfattr "$img" /README.txt
  echo
  echo "Nothing was mounted, so there is nothing to unmount."
fi
