"""Files the tool writes are whole or absent, and follow the umask like any Unix tool's.

Everything boneage writes for a user (reports, result CSVs, JSON, model files) goes through
``atomic_write``: the bytes go to a temporary file in the same folder, are flushed to disk, and the file is
renamed into place. A full disk, a crash or Ctrl+C leaves the old file (or none), never half of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask: from ``/proc/self/status`` on Linux (read without changing it, so no other thread
    ever creates a file under a borrowed mask), else by setting and restoring it under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o22)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without an
    error (mode 0o666 minus the umask, as ``open`` would give), deleted otherwise."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:80]}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(
    path: str | Path, data: bytes | str | Callable[[IO[str]], None], *, encoding: str = "utf-8"
) -> Path:
    """Write ``data`` (bytes, text, or a function writing to a text handle) to ``path``, whole or not
    at all."""
    target = Path(path)
    with atomic_path(target) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        elif isinstance(data, str):
            tmp.write_text(data, encoding=encoding)
        else:
            with open(tmp, "w", encoding=encoding, newline="") as handle:
                data(handle)
    return target
