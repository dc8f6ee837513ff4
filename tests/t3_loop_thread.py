"""What the handlers must not do on the event loop's thread, in process as
in t3_ops.py: raise out of a handler that has no reply (FORGET: it would
end pyfuse3's main loop)."""

from __future__ import annotations

import logging

import pytest

from cryptfs.fs.inodes import ROOT_INODE
from cryptfs.fs.ops import MountOptions
from cryptfs.keyfile import NEW_FEATURES
from cryptfs.mount import assemble
from tests.t3_ops import create, lookup
from tests.t3_tree import new_cipherdir


@pytest.fixture
def fs(tmp_path, engine, keys):
    """As t3_ops.py's."""
    stack = assemble(new_cipherdir(tmp_path / "cipher"), keys, engine, MountOptions(),
                     NEW_FEATURES)
    yield stack.operations
    stack.close()


async def test_a_bug_in_forget_is_logged_not_raised(fs, monkeypatch, caplog):
    ino = await create(fs, ROOT_INODE, b"f")

    def bug(ino):
        return {}[ino]

    monkeypatch.setattr(fs.handles, "forget", bug)  # runs when the inode is dropped
    with caplog.at_level(logging.ERROR):
        await fs.forget([(ino, 1)])
    assert "internal error in forget" in caplog.text and "KeyError" in caplog.text
    monkeypatch.undo()
    assert await lookup(fs, ROOT_INODE, b"f") != 0  # the mount goes on
