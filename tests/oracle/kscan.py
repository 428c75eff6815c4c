"""Kernel side of tests/oracle/mutants.py: scan a mounted tree, print JSON (run as a child process).

Usage: python kscan.py MOUNTPOINT LIMIT DATA_MAX
"""

import errno
import hashlib
import json
import os
import stat
import sys


def _en(exc):
    return "E:" + errno.errorcode.get(exc.errno, str(exc.errno))


def scan(root: bytes, limit: int, data_max: int) -> dict:
    out = {}
    stack = [b"/"]
    while stack and len(out) < limit:
        rel = stack.pop()
        full = root + (rel if rel != b"/" else b"")
        r = out.setdefault(rel.decode("utf-8", "surrogateescape"), {})
        try:
            st = os.lstat(full)
        except OSError as exc:
            r["lstat"] = _en(exc)
            continue
        r["lstat"] = [st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_mtime_ns, st.st_rdev,
                      st.st_ino]
        try:
            names = os.listxattr(full, follow_symlinks=False)
            r["xattrs"] = [os.fsencode(n).hex() for n in names]
            for n in names:
                try:
                    r["x:" + os.fsencode(n).hex()] = os.getxattr(full, n, follow_symlinks=False).hex()
                except OSError as exc:
                    r["x:" + os.fsencode(n).hex()] = _en(exc)
        except OSError as exc:
            r["xattrs"] = _en(exc)
        if stat.S_ISLNK(st.st_mode):
            try:
                r["readlink"] = os.readlink(full).hex()
            except OSError as exc:
                r["readlink"] = _en(exc)
        if stat.S_ISREG(st.st_mode):
            try:
                with open(full, "rb") as f:
                    r["data"] = hashlib.sha256(f.read(data_max)).hexdigest()
            except OSError as exc:
                r["data"] = _en(exc)
        if stat.S_ISDIR(st.st_mode):
            try:
                names = os.listdir(full)
                r["names"] = [n.hex() for n in names]
                for n in names:
                    if n:   # a name starting with NUL reads as "": nothing to lstat
                        stack.append((rel if rel != b"/" else b"") + b"/" + n)
            except OSError as exc:
                r["names"] = _en(exc)
    return out


if __name__ == "__main__":
    print(json.dumps(scan(os.fsencode(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
