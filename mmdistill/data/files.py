"""Files a dataset names: only regular files are read. A FIFO would block the reader forever
(waiting for a writer), a device could stream without end, and a directory cannot be read at
all, so each is refused with one line before anything is opened."""
from __future__ import annotations

import os
import stat


def not_regular(path) -> str | None:
    """Why ``path`` cannot be read as a data file ("no such file", "a FIFO (named pipe)", ...),
    or None when it is a regular file (a symlink counts as what it points to)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot stat it ({e.strerror or type(e).__name__})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    kind = next((name for test, name in kinds if test(mode)), "not a plain file")
    return f"not a regular file ({kind})"
