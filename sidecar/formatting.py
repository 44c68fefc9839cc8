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
