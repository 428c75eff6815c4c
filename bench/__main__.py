"""`make bench`: run every bench/bench_*.py (or the ones named: `make bench BENCH_ARGS="extract fuse"`).

Benchmarks print figures (and ratios measured in the same run); they never pass or fail.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules([str(here)])
                   if m.name.startswith("bench_"))
    chosen = argv or names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)} (have: {', '.join(names)})", file=sys.stderr)
        return 2
    for name in chosen:
        print(f"\n######## bench {name}", flush=True)
        t0 = time.monotonic()
        try:
            mod = importlib.import_module(f"bench.bench_{name}")
            mod.main([])
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
        print(f"######## bench {name}: {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
