"""Prototype only (scripts/killpriv-prototype installs it as the module
``kpv2hook`` of its private venv, loaded where KPV2=1): ask the patched
pyfuse3 for HANDLE_KILLPRIV_V2 and take on what the kernel then leaves to
the filesystem, by wrapping cryptfs' handlers.

With the flag the kernel no longer turns a write or truncate by a caller
without CAP_FSETID into a SETATTR of the mode; it sets
FUSE_WRITE_KILL_SUIDGID, FATTR_KILL_SUIDGID or FUSE_OPEN_KILL_SUIDGID on the
request instead, and libfuse (3.17, 3.18) passes only the SETATTR one on,
which pyfuse3 drops.  So the caller's capability is read here: at open and
create (the only requests of a write's file that carry the caller), kept
per handle, and at a truncating SETATTR.  An open(2) with O_TRUNC is
already handled by cryptfs itself (Operations._drop_setid).  Chown needs
nothing: the backing chown clears the bits as the kernel would.
security.capability needs nothing: cryptfs stores no security.* attribute.
"""

from __future__ import annotations

import os
import stat

from cryptfs.fs.ops import Operations, _groups
from cryptfs.fs.setid import SETID, may_keep_setid, without_setid
from cryptfs.fs.tree import apply_attributes

Operations.enable_killpriv_v2 = True
_open, _create, _write = Operations.open, Operations.create, Operations.write
_setattr, _release = Operations.setattr, Operations.release
_pending: dict[int, object] = {}  # fh -> ctx of an opener that must drop set-id bits


def _drop(fd: int, ctx) -> bool:
    """Clear what a write by ``ctx`` drops; whether anything changed."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & SETID:
        return False
    mode = without_setid(stat.S_IMODE(st.st_mode), st.st_gid, lambda: _groups(ctx))
    if mode == stat.S_IMODE(st.st_mode):
        return False
    apply_attributes(fd, mode, -1, -1, (None, None))
    return True


def _remember(self, fh: int, ctx) -> None:
    if os.fstat(self.handles.get(fh).fd).st_mode & SETID and \
            not may_keep_setid(ctx.pid, ctx.uid):
        _pending[fh] = ctx


async def _kp_open(self, inode, flags, ctx):
    info = await _open(self, inode, flags, ctx)
    _remember(self, info.fh, ctx)
    return info


async def _kp_create(self, parent_inode, name, mode, flags, ctx):
    info, attr = await _create(self, parent_inode, name, mode, flags, ctx)
    _remember(self, info.fh, ctx)
    return info, attr


async def _kp_write(self, fh, off, buf):
    ctx = _pending.pop(fh, None)
    if ctx is not None:
        _drop(self.handles.get(fh).fd, ctx)
    return await _write(self, fh, off, buf)


async def _kp_setattr(self, inode, attr, fields, fh, ctx):
    got = await _setattr(self, inode, attr, fields, fh, ctx)
    if not fields.update_size:
        return got
    st = self._stat(inode)
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & SETID or \
            may_keep_setid(ctx.pid, ctx.uid):
        return got
    mode = without_setid(stat.S_IMODE(st.st_mode), st.st_gid, lambda: _groups(ctx))
    opened = self.handles.by_ino(inode)
    if opened is not None:
        st = apply_attributes(opened.fd, mode, -1, -1, (None, None))
    else:
        st = self.tree.set_attributes(inode, mode, -1, -1, (None, None))
    return self._attrs(inode, st)


async def _kp_release(self, fh):
    _pending.pop(fh, None)
    return await _release(self, fh)


if os.environ.get("KPV2") != "2":  # KPV2=2: the flag alone, to time what the clearing costs
    for _name in ("open", "create", "write", "setattr", "release"):
        setattr(Operations, _name, globals()["_kp_" + _name])
