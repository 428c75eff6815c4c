"""Pure EROFS reader: on-disk format -> inodes, directories, xattrs and file bytes (no I/O of its own)."""
