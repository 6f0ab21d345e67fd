"""File modes of what MMM writes."""

from __future__ import annotations

import os
from pathlib import Path


def readable_as_umask_allows(folder: str | Path) -> None:
    """Give every file and folder under ``folder`` the mode the umask allows. safetensors writes
    0600 whatever the umask, so a shared weights cache, or a checkpoint served by a process of
    another user, could not be read otherwise."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
