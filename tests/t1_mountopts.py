"""The -o option string of mount(8) and fstab, as a table."""

from __future__ import annotations

import pytest

from cryptfs.cli.main import parser
from cryptfs.cli.mounting import mount_helper_args
from cryptfs.cli.mountopts import parse_mount_options
from cryptfs.errors import ExitCode, OptionError


@pytest.mark.parametrize(("text", "values", "flags", "fuse"), [
    ("", {}, set(), set()),
    ("passfile=/etc/pw", {"passfile": "/etc/pw"}, set(), set()),
    ("ro,allow_other,engine=openssl", {"engine": "openssl"}, {"ro", "allow_other"}, set()),
    ("ro,rw", {}, {"rw"}, set()),
    ("defaults,noauto,nofail,_netdev,user,x-systemd.automount,x-systemd.idle-timeout=60,"
     "comment=x,passfile=p", {"passfile": "p"}, set(), set()),
    ("nodev,nosuid,noexec,noatime,idle=300,fsname=vault", {"idle": "300", "fsname": "vault"},
     set(), {"nodev", "nosuid", "noexec", "noatime"}),
    ("extpass=echo a=b", {"extpass": "echo a=b"}, set(), set()),
    ("no_xattr,noatime", {}, {"no_xattr"}, {"noatime"}),
    ("nonempty,nodev", {}, {"nonempty"}, {"nodev"}),  # ours, never the kernel's
    ("readahead=0", {"readahead": "0"}, set(), set()),
    ("shared,nodev", {}, {"shared"}, {"nodev"}),  # a cryptfs mode, not the kernel's
])
def test_options(text, values, flags, fuse):
    parsed = parse_mount_options(text)
    assert (parsed.values, parsed.flags, parsed.fuse) == (values, flags, fuse)


@pytest.mark.parametrize("bad", ["bogus", "passfile", "passfile=", "ro=1", "uid=5,bogus=1",
                                 "no_xattr=1", "noxattr", "nonempty=1", "shared=1"])
def test_unknown_or_malformed(bad):
    with pytest.raises(OptionError) as info:
        parse_mount_options(bad)
    assert info.value.exit_code == ExitCode.USAGE


def test_helper_form_becomes_mount_arguments():
    argv = mount_helper_args(["/c", "/p", "-o", "no_xattr,ro,passfile=/pw,nodev"])
    assert argv == ["mount", "/c", "/p", "--passfile", "/pw", "--no-xattr", "--ro",
                    "--fuse-flag=nodev"]
    args = parser().parse_args(argv)
    assert (args.no_xattr, args.ro, args.passfile) == (True, True, "/pw")


def test_shared_through_the_helper_form():
    """fstab / ``mount -t fuse.cryptfs ... -o shared`` mounts ``--shared``."""
    argv = mount_helper_args(["/c", "/p", "-o", "shared,passfile=/pw"])
    assert argv == ["mount", "/c", "/p", "--passfile", "/pw", "--shared"]
    assert parser().parse_args(argv).shared
    assert not parser().parse_args(["mount", "/c", "/p"]).shared


def test_readahead_values():
    args = parser().parse_args(mount_helper_args(["/c", "/p", "-o", "readahead=256"]))
    assert args.readahead == 256
    assert parser().parse_args(["mount", "/c", "/p"]).readahead == 1024
    for bad in ("-1", "lots", "16385"):
        with pytest.raises(SystemExit):
            parser().parse_args(["mount", "/c", "/p", "--readahead", bad])


def test_reverse_through_the_helper_form():
    """An fstab line ``/data /mnt/view cryptfs reverse,exclude_from=F,config=K,...``
    mounts the reverse view with those options."""
    argv = mount_helper_args(["/d", "/v", "-o",
                              "reverse,exclude_from=/ex,config=/k,passfile=/pw"])
    args = parser().parse_args(argv)
    assert (args.reverse, args.exclude_from, args.config, args.passfile) == \
        (True, ["/ex"], "/k", "/pw")
    assert not parser().parse_args(["mount", "/c", "/p"]).reverse


def test_cache_timeout_values():
    args = parser().parse_args(mount_helper_args(["/c", "/p", "-o", "cache_timeout=2.5"]))
    assert args.cache_timeout == 2.5
    assert parser().parse_args(["mount", "/c", "/p"]).cache_timeout is None  # the default
    assert parser().parse_args(["mount", "/c", "/p", "--cache-timeout", "0"]).cache_timeout == 0
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(SystemExit):
            parser().parse_args(["mount", "/c", "/p", "--cache-timeout", bad])
