"""``boneage.files``: every file the tool writes is whole or absent, and follows the umask."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from boneage.files import atomic_write


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.csv"
    atomic_write(target, "id,value\n1,2\n")

    def full_disk(handle) -> None:  # type: ignore[no-untyped-def]
        handle.write("id,value\n1,2\n3,")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, full_disk)
    assert target.read_text() == "id,value\n1,2\n"  # the whole old table, not a fragment row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]
    with pytest.raises(KeyboardInterrupt):  # Ctrl+C mid-write: the same
        atomic_write(
            tmp_path / "new.html", lambda h: (h.write("<html>"), (_ for _ in ()).throw(KeyboardInterrupt))
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path: Path, mask: int) -> None:
    previous = os.umask(mask)
    try:
        path = atomic_write(tmp_path / f"out-{mask:o}.json", b"{}")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
