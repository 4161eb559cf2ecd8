"""Which files under a folder any process opens or reads: Linux inotify through ctypes (inotify(7)).

The kernel reports the access whichever process makes it (a ClientApp that Flower starts in its own
session included), so a test can check that a refused plan touched no patient file: not what the
silo says it did, but what the operating system saw.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

IN_ACCESS, IN_OPEN, IN_NONBLOCK = 0x001, 0x020, 0o4000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class FileAccessWatch:
    def __init__(self, root: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(IN_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._dirs: dict[int, Path] = {}
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(folder), IN_OPEN | IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder} failed")
            self._dirs[wd] = folder
        self.accessed: list[Path] = []

    def drain(self) -> list[Path]:
        """Files opened or read since the last call (events on the watched folders themselves are left out)."""
        out = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if name:
                    out.append(self._dirs[wd] / os.fsdecode(name))
        self.accessed.extend(out)
        return out

    def close(self) -> None:
        os.close(self._fd)
