"""Writing files so that a reader never sees half of one: write beside the target, then rename."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A temporary file this old is left from a process killed mid-write; a live write never takes this long.
STALE_TEMP_SECONDS = 600


@contextmanager
def atomic_path(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """A temporary path in `path`'s folder to write to; when the block succeeds it replaces `path` in one
    rename, when it fails it is removed and `path` is left as it was. The file gets the mode any new file
    gets (0666 less the umask), not tempfile's private 0600. replace=False never replaces a file: it links
    the new one in and raises FileExistsError when `path` exists (another process took the name first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never follow or reuse a file someone else put there; the kernel applies the umask to 0o666.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic and never over an existing file, also between processes
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno is None:
            raise
        # Name the file the caller asked for, not the temporary one.
        raise type(e)(e.errno, e.strerror, str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(folder: str | Path, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove atomic_path's temporary files older than `max_age` seconds from `folder` (left by a process
    killed mid-write); younger ones may belong to a live writer sharing the folder."""
    removed, now = [], time.time()
    for p in Path(folder).glob(".*.tmp"):
        try:
            if now - p.stat().st_mtime > max_age:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # another process removed it first
            pass
    return removed
