"""Writing files so that a reader never sees half of one: write beside the target, then rename."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in `path`'s folder to write to; when the block succeeds it replaces `path` in one
    rename, when it fails it is removed and `path` is left as it was. The file gets the mode any new file
    gets (0666 less the umask), not tempfile's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never follow or reuse a file someone else put there; the kernel applies the umask to 0o666.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is None:
            raise
        # Name the file the caller asked for, not the temporary one.
        raise type(e)(e.errno, e.strerror, str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)
