"""The ``cryptfs`` command (and ``mount.cryptfs``): the parser and ``main()``;
the commands are in cipherdir.py, mounting.py and checks.py.

Only ``main()`` exits: expected errors print one line and exit with their
``ExitCode``; anything else is a bug and prints a traceback (``INTERNAL``).
``cryptfs SRC DIR -o opts`` (no subcommand) is the form mount.fuse3 uses
for ``mount -t fuse.cryptfs`` and fstab type ``fuse.cryptfs``.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from cryptfs import __version__
from cryptfs.cli.checks import cmd_fsck, cmd_speed
from cryptfs.cli.cipherdir import cmd_info, cmd_init, cmd_key, cmd_passwd
from cryptfs.cli.mounting import cmd_install_helpers, cmd_mount, cmd_unmount, mount_helper_args
from cryptfs.cli.paths import cmd_path
from cryptfs.cli.reverse import cmd_init_reverse, cmd_mount_reverse
from cryptfs.engines import ENGINE_NAMES
from cryptfs.errors import CryptfsError, ExitCode, UsageError
from cryptfs.fs.dircache import DEFAULT_LIMIT
from cryptfs.fs.ops import MountOptions
from cryptfs.lowlevel.log import setup_logging

SUBCOMMANDS = {"init", "mount", "unmount", "passwd", "key", "info", "install-helpers", "fsck",
               "speed", "path"}


# --- argument parsing ----------------------------------------------------------------


def _seconds(text: str) -> float:
    """--cache-timeout SECONDS: 0 or more (fractions allowed)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _readahead(text: str) -> int:
    """--readahead KIB: 0 (the kernel's default) to 16384."""
    if not text.isdigit() or int(text) > 16384:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of KiB from 0 to 16384")
    return int(text)


def _password_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passfile", help="read the password from the first line of FILE")
    p.add_argument("--extpass", metavar="CMD", help="read the password from CMD's output")


def _kdf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--argon2-memory", type=int, default=256, metavar="MIB",
                   help="Argon2id memory cost in MiB (default 256)")
    p.add_argument("--argon2-passes", type=int, default=3, metavar="N",
                   help="Argon2id passes (default 3)")


def _verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also say which crypto engine is used and why")


def _either(reverse, forward):
    """The command for ``--reverse`` or the forward one."""

    def run(args: argparse.Namespace) -> None:
        (reverse if args.reverse else forward)(args)

    return run


def _check_reverse_only(args: argparse.Namespace) -> None:
    """Options that mean something only for a reverse view."""
    if getattr(args, "reverse", True):
        return
    given = [flag for flag, value in (("--config", getattr(args, "config", None)),
                                      ("--exclude", getattr(args, "exclude", None)),
                                      ("--exclude-from", getattr(args, "exclude_from", None)))
             if value]
    if given:
        raise UsageError(f"{', '.join(given)} only go with --reverse")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="cryptfs", description="An encrypted FUSE filesystem.")
    top.add_argument("--version", action="version", version=f"cryptfs {__version__}")
    top.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    top.add_argument("-v", "--verbose", action="store_true",
                     help="also say which crypto engine is used and why")
    sub = top.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a new cipher directory")
    init.add_argument("cipherdir")
    _password_args(init)
    _kdf_args(init)
    init.add_argument("--force", action="store_true", help="initialise a non-empty directory")
    init.add_argument("--no-recovery-code", action="store_true",
                      help="do not print the recovery code")
    init.add_argument("--authenticated", action="store_true",
                      help="tag every page (HMAC-SHA256): tampering, truncation and moved "
                           "pages read as EIO; costs speed (see README)")
    init.add_argument("--reverse", action="store_true",
                      help="CIPHERDIR is a plaintext directory: make the key file of its "
                           "encrypted view (cryptfs mount --reverse), hidden in it as "
                           ".cryptfs.reverse.conf or at --config")
    init.add_argument("--config", metavar="FILE",
                      help="with --reverse: put the key file here instead")
    init.set_defaults(func=_either(cmd_init_reverse, cmd_init))

    mount = sub.add_parser("mount", help="mount a cipher directory")
    mount.add_argument("cipherdir")
    mount.add_argument("mountpoint")
    _password_args(mount)
    mount.add_argument("--recovery", action="store_true",
                       help="unlock with the recovery code instead of a password")
    mount.add_argument("--engine", choices=ENGINE_NAMES, default="auto")
    mount.add_argument("--ro", action="store_true", help="mount read-only")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users access the mount (with permission checks)")
    mount.add_argument("--idle", type=float, metavar="SECONDS",
                       help="unmount after this long without activity")
    mount.add_argument("--fsname", help="name shown in /proc/mounts")
    mount.add_argument("--no-xattr", action="store_true",
                       help="refuse all extended attributes (saves a request per write)")
    mount.add_argument("--readahead", type=_readahead, default=MountOptions.readahead_kb,
                       metavar="KIB",
                       help="kernel read-ahead on the mount, as root (default 1024: "
                            "1 MiB read requests; 0: the kernel's default)")
    mount.add_argument("--cache-timeout", type=_seconds, default=None, metavar="SECONDS",
                       help="how long the kernel may cache names and attributes (default "
                            f"{MountOptions.entry_timeout:g}; changes made behind the mount's "
                            "back, by a sync tool, show this late; --shared: always 0)")
    mount.add_argument("--shared", action="store_true",
                       help="for a cipher directory others change while it is mounted "
                            "(other --shared mounts, here or on other machines over NFS): "
                            "no kernel caching of names and attributes (see README)")
    mount.add_argument("--nonempty", action="store_true",
                       help="mount over a non-empty directory (hiding its files)")
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="stay in the foreground and log to stderr")
    mount.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="debug logs (also accepted before the subcommand)")
    _verbose_arg(mount)
    mount.add_argument("--fuse-flag", action="append", dest="fuse_flags", default=[],
                       help=argparse.SUPPRESS)  # kernel mount flags from -o (nodev, ...)
    mount.add_argument("--inline-max", type=int, default=None,
                       help=argparse.SUPPRESS)  # tuning experiments (scripts/bench)
    mount.add_argument("--dir-fds", type=int, default=DEFAULT_LIMIT,
                       help=argparse.SUPPRESS)  # directory descriptors kept open (tests)
    mount.add_argument("--reverse", action="store_true",
                       help="mount a read-only encrypted view of the plaintext directory "
                            "CIPHERDIR, for backups (see README)")
    mount.add_argument("--config", metavar="FILE",
                       help="with --reverse: the key file, if not in the directory")
    mount.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                       help="with --reverse: leave out what matches (gitignore syntax; "
                            "repeatable)")
    mount.add_argument("--exclude-from", "--exclude_from", action="append", default=[],
                       metavar="FILE",
                       help="with --reverse: leave out what the patterns in FILE match")
    mount.set_defaults(func=_either(cmd_mount_reverse, cmd_mount))

    unmount = sub.add_parser("unmount", help="unmount (flushes and stops the daemon)")
    unmount.add_argument("mountpoint")
    unmount.add_argument("-l", "-z", "--lazy", action="store_true",
                         help="detach now even if busy; the daemon ends when the last "
                              "file there is closed")
    unmount.set_defaults(func=cmd_unmount)

    passwd = sub.add_parser("passwd", help="change the password")
    passwd.add_argument("cipherdir")
    _password_args(passwd)
    passwd.add_argument("--new-passfile", help="read the new password from FILE")
    passwd.set_defaults(func=cmd_passwd, recovery=False)

    key = sub.add_parser("key", help="manage key slots (several passwords)")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    key_list = key_sub.add_parser("list", help="list key slots (no password needed)")
    key_list.add_argument("cipherdir")
    key_add = key_sub.add_parser("add", help="add a password slot")
    key_add.add_argument("cipherdir")
    _password_args(key_add)
    _kdf_args(key_add)
    key_add.add_argument("--new-passfile", help="read the new password from FILE")
    key_add.add_argument("--label", default="", help="a note to recognise the slot by")
    key_remove = key_sub.add_parser("remove", help="remove a slot")
    key_remove.add_argument("cipherdir")
    key_remove.add_argument("slot", type=int)
    _password_args(key_remove)
    key.set_defaults(func=cmd_key, recovery=False)

    helpers = sub.add_parser("install-helpers",
                             help="link cryptfs and mount.cryptfs where mount(8) finds them")
    helpers.add_argument("--bindir", default="/usr/local/bin")
    helpers.add_argument("--sbindir", default="/sbin")
    helpers.set_defaults(func=cmd_install_helpers)

    fsck = sub.add_parser("fsck", help="check a whole cipher directory (read-only)")
    fsck.add_argument("cipherdir")
    _password_args(fsck)
    fsck.add_argument("--recovery", action="store_true", help="unlock with the recovery code")
    fsck.add_argument("--engine", choices=ENGINE_NAMES, default="auto")
    fsck.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    fsck.add_argument("--force", action="store_true",
                      help="check even while it is mounted (changes in progress may show "
                           "as damage)")
    fsck.add_argument("--repair", action="store_true",
                      help="first undo what a sync tool did that needs no choice: names "
                           "stranded under a copy of a directory IV, redundant copies "
                           "(conflict copies of files are left to you; docs/conflicts.md)")
    _verbose_arg(fsck)
    fsck.set_defaults(func=cmd_fsck)

    info = sub.add_parser("info", help="format, key slots and engine (never key material)")
    info.add_argument("cipherdir")
    info.set_defaults(func=cmd_info)

    path = sub.add_parser("path", help="map plaintext paths to backing paths and back "
                                       "(read-only; works while mounted; without a password, "
                                       "the running mount answers)")
    path_sub = path.add_subparsers(dest="path_command", required=True)
    for command, what, help_text in (
            ("encrypt", "plain_path", "print the backing path of a plaintext path (relative "
             "to CIPHERDIR), then the sidecar of each long name, one per line"),
            ("decrypt", "backing_path", "print the plaintext path of a backing path (relative "
             "to CIPHERDIR or absolute; in reverse, relative to the view's root; a sidecar "
             "maps to its entry)")):
        p = path_sub.add_parser(command, help=help_text)
        p.add_argument("cipherdir", metavar="DIR",
                       help="the cipher directory, or the plaintext directory of a reverse "
                            "configuration (its view's paths are mapped)")
        p.add_argument("path", metavar=what.upper())
        _password_args(p)
        p.add_argument("--recovery", action="store_true", help="unlock with the recovery code")
        p.add_argument("--reverse", action="store_true",
                       help="DIR is a reverse configuration's plaintext directory (found "
                            "without it when DIR holds .cryptfs.reverse.conf)")
        p.add_argument("--config", metavar="FILE",
                       help="with --reverse: the reverse key file, if not in DIR")
        p.add_argument("--via-mount", action="store_true",
                       help="ask the running mount of DIR (its control socket), never for "
                            "the password; the default without --passfile/--extpass")
        p.add_argument("--json", action="store_true",
                       help="every component's plaintext and backing path and sidecar")
    path.set_defaults(func=cmd_path)

    speed_cmd = sub.add_parser("speed", help="measure each crypto engine on this machine")
    speed_cmd.add_argument("--seconds", type=float, default=0.5, help="per figure (default 0.5)")
    speed_cmd.add_argument("--dir", help="where the test backing file goes (default: $TMPDIR)")
    speed_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    speed_cmd.set_defaults(func=cmd_speed)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
            argv = mount_helper_args(argv)  # the mount.fuse3 / mount(8) helper form
    except CryptfsError as exc:
        print(f"cryptfs: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser().parse_args(argv)
    setup_logging(args.debug, args.verbose)
    try:
        _check_reverse_only(args)
        args.func(args)
    except CryptfsError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"cryptfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return ExitCode.USAGE
    except Exception:
        traceback.print_exc()
        return ExitCode.INTERNAL
    return ExitCode.OK


def mount_helper_main() -> int:
    """``mount.cryptfs SRC DIR -o ...``: fstab type ``cryptfs``."""
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
