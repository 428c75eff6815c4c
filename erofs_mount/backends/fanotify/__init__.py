"""fanotify mode: the kernel's erofs driver mounts a sparse file directly (file-backed mount) and a
daemon fills it on demand from FAN_PRE_ACCESS pre-content events (Linux 6.14+)."""
