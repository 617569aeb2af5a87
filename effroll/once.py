"""Warn once: the first time a reason comes up, not at every call that meets it again."""

from __future__ import annotations

import warnings

_SEEN: set[str] = set()  # reasons already warned about in this process


def warn_once(key: str, message: str, seen: set[str] | None = None, stacklevel: int = 3) -> bool:
    """``warnings.warn(message, RuntimeWarning)`` unless ``key`` is in ``seen`` (default: this process's set);
    returns whether it warned. Pass your own set to scope "once" (per engine, per rollout)."""
    seen = _SEEN if seen is None else seen
    if key in seen:
        return False
    seen.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
    return True


def forget() -> None:
    """Forget the process-wide reasons (tests)."""
    _SEEN.clear()
