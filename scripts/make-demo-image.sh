#!/usr/bin/env bash
# Rebuild demo/demo.erofs, the small image `make run` mounts (needs mkfs.erofs; run as root for owners/xattrs).
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(mktemp -d)
chmod 755 "$tree"
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/docs" "$tree/bin" "$tree/data"
cat > "$tree/README.txt" <<'TXT'
Hello from inside an EROFS image!

This tree was packed by mkfs.erofs (lz4hc, compact indexes) and is being read by
erofs-mount's pure-Python EROFS reader. Everything you see — names, modes, owners,
mtimes, symlinks, hard links and xattrs — comes from the image.
TXT
python3 - "$tree" <<'PY'
import os, sys, random
root = sys.argv[1]
rnd = random.Random(7)
words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
with open(f"{root}/docs/lorem.txt", "w") as f:
    for i in range(4000):
        f.write(" ".join(rnd.choice(words) for _ in range(12)) + "\n")
with open(f"{root}/data/random.bin", "wb") as f:
    f.write(rnd.randbytes(96 * 1024))
with open(f"{root}/data/zeros.bin", "wb") as f:
    f.write(bytes(256 * 1024))
PY
printf '#!/bin/sh\necho "hello from erofs"\n' > "$tree/bin/hello"
chmod 755 "$tree/bin/hello"
ln -s ../README.txt "$tree/docs/README-link"
ln "$tree/docs/lorem.txt" "$tree/docs/lorem-hardlink.txt"
setfattr -n user.demo -v "erofs-mount demo" "$tree/README.txt" 2>/dev/null || true
find "$tree" -exec touch -h -d "2024-05-01 12:00:00.123456789" {} +
mkfs.erofs --quiet -zlz4hc -T1714564800 -U 6b0b4b9e-7c1e-4f52-9a4e-0e3f5d1d2c3b demo/demo.erofs "$tree"
ls -l demo/demo.erofs
