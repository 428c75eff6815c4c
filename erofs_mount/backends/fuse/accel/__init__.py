"""FUSE accelerators: optional parts that make the request path faster, never different.

The request path (``ops.py``, ``dirops.py``, ``attrs.py``, ``lifecycle.py``) answers every FUSE
request from the pure reader (``erofs.image.Image``) in a worker thread.  An accelerator changes
only *where* (the trio thread, a second process, the kernel's page cache ahead of time) and *when*
an answer is produced, never *what*:

* the bytes and attributes it hands out come from the same ``Image`` calls the plain path makes
  (a decoded READ is ``Image.read`` of exactly that inode, offset and size; a stored page is the
  file's ``Image.read`` from offset 0);
* it may decline at any moment (``inline.WouldBlock``, a store refused under the deadlock rule,
  a decoder process that died): the request path then does what it does with it switched off;
* it never turns a success into an error or an error into a success: a failed guess is dropped
  and the plain path reports the failure with its errno.

Each one is switched by name with ``-o accel=...`` (default ``all``): ``accel=none`` serves the
mount with the plain path only, ``accel=inline:pagestore`` with those two, ``accel=-decoder``
with every one but the decoder.  ``tests/fuse/test_accel_fuse.py`` mounts corpus images both
ways and compares every byte and field.

=============  ============================================================================
name           what it does (module)
=============  ============================================================================
inline         reader calls are tried on the trio thread first; a read that would wait
               for the disk or network is redone in a worker thread (inline.py)
pagestore      a small file's bytes go into the kernel's page cache at OPEN: no READ
               (pagestore.py)
storeahead     the next file of a directory listing is stored while the daemon waits for
               the walker's next request (storeahead.py; needs inline, pagestore, busypoll)
readnext       the next file listed is read in a worker thread while the walker reads this
               one, when storeahead finds it would block (readnext.py; needs pagestore)
decoder        a second process decodes the big READs of compressed files ahead (decoder.py,
               decodeplan.py, decodeproc.py)
shim           a lock on pyfuse3's request loop that needs no scheduler pass (shim.py)
busypoll       /dev/fuse is polled for a few microseconds before the daemon sleeps
               (busypoll.py; needs shim, which carries its wait into pyfuse3)
readahead      a 1 MiB read-ahead window for compressed and remote images (readahead.py;
               root only)
=============  ============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from ....errors import UsageError

NAMES = ("inline", "pagestore", "storeahead", "readnext", "decoder", "shim", "busypoll", "readahead")
NEEDS = {"storeahead": ("inline", "pagestore", "busypoll"), "readnext": ("pagestore",), "busypoll": ("shim",)}


@dataclass(frozen=True)
class Accel:
    """The accelerators switched on for one mount."""

    enabled: frozenset[str] = frozenset(NAMES)

    @classmethod
    def parse(cls, value: str | None) -> "Accel":
        """``all``, ``none``, or ``:``-separated names; names with a leading ``-`` are taken away
        from ``all`` (``-decoder``) or from the names before them."""
        if value is None or value == "all":
            return cls()
        tokens = [t for t in value.split(":") if t]
        enabled = set(NAMES) if tokens and tokens[0].startswith("-") else set()
        for token in tokens:
            name = token.lstrip("-")
            if token in ("all", "none"):
                enabled = set(NAMES) if token == "all" else set()
                continue
            if name not in NAMES:
                raise UsageError(f"accel={value}: unknown accelerator '{name}' "
                                 f"(all, none, or of {', '.join(NAMES)}, ':'-separated)")
            if token.startswith("-"):
                enabled.discard(name)
            else:
                enabled.add(name)
        return cls(frozenset(enabled))

    def on(self, name: str) -> bool:
        """Whether ``name`` is switched on and so are the accelerators it needs."""
        if name not in NAMES:
            raise KeyError(name)
        return name in self.enabled and all(self.on(n) for n in NEEDS.get(name, ()))

    def __str__(self) -> str:
        if self.enabled == frozenset(NAMES):
            return "all"
        return ":".join(n for n in NAMES if n in self.enabled) or "none"
