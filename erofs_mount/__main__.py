"""``python -m erofs_mount``."""

from .cli import main

raise SystemExit(main())
