"""Files: outputs checked before any work and written whole or not at all; the cache directory (no torch, no
effroll imports)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def check_writable(path: str | Path, what: str = "--out") -> Path:
    """``path`` as a Path once its directory exists (created if needed) and takes a new file there;
    otherwise a ValueError naming ``what`` and the reason. Run it before the work whose result goes there."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a file")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p.parent, prefix=f".{p.name}.", suffix=".check"):
            pass
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} is not writable: {e.strerror or e}") from None
    return p


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Write to a temporary file beside ``path``, renamed onto it when the block ends without an error:
    readers see the old file or the whole new one, never a part (the temporary is removed on failure)."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cache_dir() -> Path:
    """Where effroll keeps fetched models and built kernels: ``$EFFROLL_CACHE``, else ``~/.cache/effroll``."""
    return Path(os.environ.get("EFFROLL_CACHE", Path.home() / ".cache" / "effroll"))
