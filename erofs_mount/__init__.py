"""erofs-mount: mount EROFS images (local files or OCI registry layers) over NBD or FUSE."""

__version__ = "0.1.0"
