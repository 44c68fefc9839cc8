"""Small text formatting shared by the commands (``enqueue``'s progress, ``status``)."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s, 17s."""
    whole = int(seconds)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole}s"


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 job``, ``2 jobs``, ``1,000 jobs``; ``many`` for a plural that is not ``word + "s"``."""
    return f"{count:,} {word if count == 1 else many or word + 's'}"
