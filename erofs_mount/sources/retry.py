"""Retry decisions for remote reads (PURE): which answers to retry, and how long to wait.

Exponential backoff with full jitter (the "Exponential Backoff And Jitter"
scheme), honouring ``Retry-After`` (RFC 9110 §10.2.3: delay-seconds or an
HTTP-date), bounded both in attempts and in total time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    """Seconds to wait, or None when absent/unparseable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now_epoch)


@dataclass
class RetryPolicy:
    retries: int = 6  # attempts beyond the first
    total: float = 60.0  # seconds from the first attempt
    base: float = 0.1
    cap: float = 5.0
    rng: random.Random | None = None

    def delay(self, attempt: int, retry_after: float | None, elapsed: float) -> float | None:
        """Wait before attempt number *attempt* (1 = first retry); None = give up."""
        if attempt > self.retries:
            return None
        remaining = self.total - elapsed
        if remaining <= 0:
            return None
        if retry_after is not None:
            wait = retry_after
        else:
            rng = self.rng or random
            wait = rng.uniform(0, min(self.cap, self.base * (2 ** (attempt - 1))))
        if wait >= remaining:
            return None
        return wait
