"""/proc/self/mountinfo as the kernel writes it (proc(5)), as a table."""

from __future__ import annotations

import pytest

from cryptfs.daemon.mountpoint import MountEntry, local_locks, parse_mountinfo


@pytest.mark.parametrize(("line", "entry"), [
    ("36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue",
     MountEntry("/mnt2", "ext3", "/dev/root", "98:0", "rw,errors=continue")),
    ("45 27 0:40 / /tmp/c/p rw,nosuid,nodev,relatime - fuse.cryptfs /tmp/c/c "
     "rw,user_id=0,group_id=0", MountEntry("/tmp/c/p", "fuse.cryptfs", "/tmp/c/c", "0:40",
                "rw,user_id=0,group_id=0")),
    # no optional fields, and several
    ("1 0 8:1 / / rw - ext4 /dev/sda1 rw", MountEntry("/", "ext4", "/dev/sda1", "8:1", "rw")),
    ("2 1 0:5 / /a rw shared:2 master:3 propagate_from:4 - tmpfs tmpfs rw",
     MountEntry("/a", "tmpfs", "tmpfs", "0:5", "rw")),
    # space, tab, newline and backslash are octal escapes
    (r"3 1 0:41 / /home/me/my\040private\011x\012y\134z rw - fuse.cryptfs /c\040d rw",
     MountEntry("/home/me/my private\tx\ny\\z", "fuse.cryptfs", "/c d", "0:41", "rw")),
    # a mount point named "-" is not the separator
    ("4 1 0:42 / /- rw - tmpfs none rw", MountEntry("/-", "tmpfs", "none", "0:42", "rw")),
])
def test_entries(line, entry):
    assert parse_mountinfo(line + "\n") == [entry]


def test_order_is_kept_and_junk_skipped():
    text = ("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
            "truncated line\n"
            "2 1 0:5 / /m rw - tmpfs a rw\n"
            "3 1 0:6 / /m rw - fuse.cryptfs b rw\n")
    assert [e.source for e in parse_mountinfo(text)] == ["/dev/sda1", "a", "b"]


NFS = "7 1 0:50 / /net rw,relatime - nfs4 server:/ rw,vers=4.2,hard,proto=tcp,local_lock={}\n"


@pytest.mark.parametrize(("options", "refused"), [
    ("none", None),
    ("none,nolock", "nolock"),  # NFSv3 without the lock manager
    ("all", "local_lock=all"),
    ("posix", "local_lock=posix"),  # byte-range locks would stay here
    ("flock", "local_lock=flock"),  # the mount lock would stay here
])
def test_shared_mounts_need_locks_that_reach_the_nfs_server(tmp_path, options, refused):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n" + NFS.format(options))
    why = local_locks("/net/cipher", str(mountinfo))
    assert (why is None) if refused is None else (refused in why)
    assert local_locks("/elsewhere/cipher", str(mountinfo)) is None  # ext4: not shared
