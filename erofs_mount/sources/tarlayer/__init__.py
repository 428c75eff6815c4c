"""Tar layers (tar, tar+gzip, tar+zstd) served as EROFS images through a tar index.

kinds.py   PURE: media type / first bytes → layer kind
build.py   the one indexing pass (tarindex + gzindex over the streamed blob)
store.py   the index files in the persistent cache (atomic, verified on reuse)
gzreader.py  random reads of the tar inside a gzip blob, through its checkpoints
source.py  TarLayerSource: index + tar as one image
openlayer.py  open_tar_layer / open_local_layer
"""

from __future__ import annotations

from .kinds import layer_kind, sniff


def local_kind(path: str) -> str | None:
    """``"tar"``, ``"gzip"`` or ``"zstd"`` when the local file at ``path`` is a tar layer, else None
    (an EROFS image, anything else, or unreadable: the image opener then says what is wrong)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    kind = sniff(head)
    return kind if kind in ("tar", "gzip", "zstd") else None


__all__ = ["layer_kind", "local_kind", "sniff"]
