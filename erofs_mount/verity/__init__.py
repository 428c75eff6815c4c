"""Verified reads: dm-verity hash trees (issue 22).

* ``tree.py``   — pure: the superblock, the tree's geometry, building (``build``) and the checking
  state (``TreeState``: verified hash blocks, which ranges a read needs first).
* ``source.py`` — ``open_verified(inner, root)``: a source whose every block is checked before use
  (FUSE and fanotify modes; also the cache gate of a registry blob).
* ``format.py`` — ``erofs-mount verity-format IMAGE``: the tree appended to an image.
* ``dm.py``     — NBD mode: a dm-verity device over /dev/nbdN made with device-mapper ioctls.
* ``options.py``— where the root hash comes from (``-o verity.roothash=``, a layer annotation of a
  manifest resolved by digest) and ``verity=off|auto|require``.
"""
