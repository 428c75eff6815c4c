"""Helpers shared by the benchmarks: build an image once, time a command."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


def build_image(tree: Path, image: Path, *opts: str) -> Path:
    """``mkfs.erofs [opts] image tree`` unless the image exists already (built atomically)."""
    if not image.exists():
        subprocess.run(["mkfs.erofs", "--quiet", *opts, str(image) + ".tmp", str(tree)], check=True)
        os.rename(str(image) + ".tmp", image)
    return image


def timed(cmd: list[str], dest: Path) -> float:
    """Seconds ``cmd`` takes to fill an empty ``dest`` (emptied again afterwards)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    shutil.rmtree(dest, ignore_errors=True)
    return dt
