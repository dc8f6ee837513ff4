"""Driving ``Operations`` without the kernel: a request context, create /
lookup / read calls, setattr arguments, a bare cipher directory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pyfuse3

from cryptfs.fs.ops import Operations
from cryptfs.names.filenames import create_diriv


@dataclass
class Ctx:
    """What pyfuse3 passes as the request context."""

    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    pid: int = field(default_factory=os.getpid)
    umask: int = 0o022


CTX = Ctx()


async def create(fs: Operations, parent: int, name: bytes, data: bytes = b"") -> int:
    fi, attr = await fs.create(parent, name, 0o644, os.O_RDWR, CTX)
    if data:
        assert await fs.write(fi.fh, 0, data) == len(data)
    await fs.release(fi.fh)
    return attr.st_ino


async def read_all(fs: Operations, ino: int) -> bytes:
    fi = await fs.open(ino, os.O_RDONLY, CTX)
    try:
        return await fs.read(fi.fh, 0, 1 << 24)
    finally:
        await fs.release(fi.fh)


async def lookup(fs: Operations, parent: int, name: bytes) -> int:
    attr = await fs.lookup(parent, name, CTX)
    return attr.st_ino


def changes(**values):
    """``setattr``'s attributes and fields for changing ``values`` only
    (``st_mode=0o644``, ``st_size=0``, ...)."""
    attr = pyfuse3.EntryAttributes()
    fields = dict.fromkeys(["update_size", "update_mode", "update_uid", "update_gid",
                            "update_atime", "update_mtime", "update_ctime"], False)
    for name, value in values.items():
        setattr(attr, name, value)
        fields["update_" + name.removeprefix("st_").removesuffix("_ns")] = True
    fields["update_ctime"] = True  # the kernel sends it with every change a caller asks for
    return attr, SimpleNamespace(**fields)


def new_cipherdir(path: Path) -> Path:
    """A cipher directory as ``cryptfs init`` leaves it, minus the key file."""
    path.mkdir()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        create_diriv(fd)
    finally:
        os.close(fd)
    return path
