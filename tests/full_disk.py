"""A real full file system: a small tmpfs (root only), filled to the last byte and emptied again."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Optional

FILL_CHUNK = 64 * 1024


class TinyDisk:
    """mount() a tmpfs of size_kb at `path`; fill() until ENOSPC; free() gives the space back."""

    def __init__(self, path: Path, size_kb: int = 1024) -> None:
        self.path = Path(path)
        self.size_kb = size_kb
        self.filler = self.path / ".filler"
        self.mounted = False

    def mount(self) -> Optional[str]:
        """None when mounted; else why not (not root, no mount(8), a container without the right)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return "mounting a tmpfs needs root"
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_kb}k,mode=0777", "tmpfs",
                                 str(self.path)], capture_output=True, text=True)
        if result.returncode != 0:
            return f"mount -t tmpfs failed: {result.stderr.strip()}"
        self.mounted = True
        return None

    def fill(self) -> int:
        """Write until the file system refuses with ENOSPC, to the last byte; the bytes written."""
        written = 0
        size = FILL_CHUNK
        fd = os.open(str(self.filler), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while size >= 1:
                try:
                    written += os.write(fd, b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    size //= 2
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        if self.filler.exists():
            self.filler.unlink()

    def umount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
            self.mounted = False
