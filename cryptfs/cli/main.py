"""The ``cryptfs`` command (and ``mount.cryptfs``).

Only ``main()`` exits: expected errors print one line and exit with their
``ExitCode``; anything else is a bug and prints a traceback (``INTERNAL``).
``cryptfs SRC DIR -o opts`` (no subcommand) is the form mount.fuse3 uses
for ``mount -t fuse.cryptfs`` and fstab type ``fuse.cryptfs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import trio

from cryptfs import __version__
from cryptfs.cli.mountopts import parse_mount_options
from cryptfs.content.codec import ContentCodec
from cryptfs.content.sessions import SessionCache
from cryptfs.daemon.daemonize import detach
from cryptfs.daemon.lock import (
    AlreadyMountedError,
    MountLock,
    lock_cipherdir,
    lock_for_check,
    wait_released,
)
from cryptfs.daemon.mount import build_stack, fuse_options, mounted, serve
from cryptfs.daemon.mountpoint import (
    canonical,
    cryptfs_mount_at,
    prepare_mountpoint,
    unmount_cryptfs,
)
from cryptfs.engines import ENGINE_NAMES, select_engine
from cryptfs.errors import CipherDirError, CryptfsError, ExitCode, ProblemsFound, UsageError
from cryptfs.fs.dircache import DEFAULT_LIMIT
from cryptfs.fs.ops import MountOptions
from cryptfs.keys.hierarchy import KeyRing, protect_process
from cryptfs.keys.keyfile import (
    FEATURE_AUTHENTICATED,
    FORMAT_VERSION,
    KEYFILE_NAME,
    NEW_FEATURES,
    KdfParams,
    KeyFile,
)
from cryptfs.keys.password import get_password
from cryptfs.keys.recovery import decode_recovery_code, encode_recovery_code
from cryptfs.lowlevel.log import setup_logging
from cryptfs.names.filenames import DIRIV_NAME, NameCipher, create_diriv
from cryptfs.names.metadata import MetadataCipher
from cryptfs.tools import speed
from cryptfs.tools.fsck import Checker, as_json, print_report

log = logging.getLogger("cryptfs")
SUBCOMMANDS = {"init", "mount", "unmount", "passwd", "key", "info", "install-helpers", "fsck",
               "speed"}



FUSE_CONF = Path("/etc/fuse.conf")  # where fusermount3 reads user_allow_other


def check_allow_other(euid: int, conf: Path = FUSE_CONF) -> None:
    """Refuse ``--allow-other`` for a user fusermount3 will refuse it to,
    before the password is asked for: one line saying what to add, instead
    of fusermount3's and libfuse's lines after it.  Read as fusermount3
    reads it: comments and blanks stripped, a last line without its
    newline ignored."""
    if euid == 0:
        return
    try:
        lines = conf.read_text(errors="replace").split("\n")[:-1]
    except OSError:
        lines = []
    if any(line.split("#", 1)[0].strip() == "user_allow_other" for line in lines):
        return
    raise UsageError(f"--allow-other needs the line 'user_allow_other' in {conf} "
                     "(add it as root), or mount as root")


def _kdf(args: argparse.Namespace) -> KdfParams:
    return KdfParams.argon2id(memory_kib=args.argon2_memory * 1024,
                              iterations=args.argon2_passes)


def _readahead(text: str) -> int:
    """--readahead KIB: 0 (the kernel's default) to 16384."""
    if not text.isdigit() or int(text) > 16384:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of KiB from 0 to 16384")
    return int(text)


def _cipherdir(path: str) -> Path:
    cipherdir = Path(path)
    if not cipherdir.is_dir():
        raise CipherDirError(f"cipher directory {cipherdir} does not exist")
    return cipherdir


def _check_writable(cipherdir: Path, hint: str = "") -> None:
    """Before any password is asked for: a key file change writes a new file
    and renames it in the cipher directory, a mount its lock file."""
    if os.access(cipherdir, os.W_OK):
        return
    read_only = os.statvfs(cipherdir).f_flag & os.ST_RDONLY
    raise CipherDirError(f"cannot write to {cipherdir}: "
                         + ("it is on a read-only filesystem" if read_only
                            else "permission denied") + hint)


def _unlock(cipherdir: Path, args: argparse.Namespace) -> tuple[KeyFile, KeyRing]:
    protect_process()  # before any key is in memory
    keyfile = KeyFile.load(cipherdir)
    if getattr(args, "recovery", False):
        code = get_password(args.passfile, args.extpass, prompt="Recovery code: ")
        return keyfile, keyfile.verify(decode_recovery_code(code.decode("ascii", "replace")))
    return keyfile, keyfile.unlock(get_password(args.passfile, args.extpass))


# --- subcommands -------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    cipherdir = _cipherdir(args.cipherdir)
    if (cipherdir / KEYFILE_NAME).exists():
        raise CipherDirError(f"{cipherdir} is already a cryptfs cipher directory")
    if any(cipherdir.iterdir()) and not args.force:
        raise CipherDirError(f"{cipherdir} is not empty (use --force to initialise it anyway)")
    _check_writable(cipherdir)
    password = get_password(args.passfile, args.extpass, confirm=True)
    protect_process()
    features = (*NEW_FEATURES, FEATURE_AUTHENTICATED) if args.authenticated else NEW_FEATURES
    keyfile, keys = KeyFile.create(password, _kdf(args), features)
    if not (cipherdir / DIRIV_NAME).exists():
        fd = os.open(cipherdir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            create_diriv(fd)
        except OSError as exc:
            raise CipherDirError(f"cannot write {cipherdir / DIRIV_NAME}: "
                                 f"{exc.strerror}") from exc
        finally:
            os.close(fd)
    keyfile.save(cipherdir)
    mode = " (authenticated: every page tagged, tampering reads as EIO)" \
        if keyfile.authenticated else ""
    print(f"cryptfs: initialised {cipherdir}{mode}")
    if not args.no_recovery_code:
        print("\nRecovery code (unlocks this directory if the password is lost; anyone\n"
              "holding it can read everything: store it offline, then forget it):\n\n"
              f"    {encode_recovery_code(keys.master_key)}\n")
    keys.wipe()


def cmd_mount(args: argparse.Namespace) -> None:
    cipherdir, mountpoint = _cipherdir(args.cipherdir), Path(args.mountpoint)
    if args.allow_other:
        check_allow_other(os.geteuid())
    KeyFile.load(cipherdir)  # a cipher directory, before a lock file goes into it
    if not args.ro:
        _check_writable(cipherdir, hint=" (mount it with --ro)")
    # The lock is refused before the password is asked for; the daemon holds
    # it until it ends, however it ends.
    with lock_cipherdir(cipherdir, read_only=args.ro):
        prepare_mountpoint(mountpoint, nonempty=args.nonempty)
        _mount_and_serve(cipherdir, mountpoint, args)


def _mount_and_serve(cipherdir: Path, mountpoint: Path, args: argparse.Namespace) -> None:
    keyfile, keys = _unlock(cipherdir, args)
    options = MountOptions(read_only=args.ro, allow_other=args.allow_other,
                           inline_max=args.inline_max, dir_fds=args.dir_fds,
                           xattrs=not args.no_xattr, readahead_kb=args.readahead)
    stack = build_stack(cipherdir, keys, args.engine, options, keyfile.features)
    fsname = args.fsname or os.path.abspath(cipherdir)
    opts = fuse_options(options, fsname) | set(args.fuse_flags)
    where = canonical(mountpoint)  # before mounting: resolving a mount waits for it
    with mounted(stack, mountpoint, opts):
        log.info("mounted %s on %s", cipherdir, mountpoint)
        if not args.foreground:
            detach()
            keys.lock_memory()  # memory locks are not inherited across fork
        # For the log (syslog once detached), not the terminal: see select_engine.
        log.info("engine: %s", stack.sessions.engine.describe())
        trio.run(serve, stack, args.idle, where)
    keys.wipe()


def cmd_unmount(args: argparse.Namespace) -> None:
    """Returns once the daemon has ended (its lock on the cipher directory is
    free), so that a mount right after it, or a backup, finds it finished."""
    mountpoint = Path(args.mountpoint)
    entry = cryptfs_mount_at(mountpoint)
    note = unmount_cryptfs(entry, lazy=args.lazy)
    if note:
        print(f"cryptfs: {mountpoint}: {note}", file=sys.stderr)
    if not args.lazy and not wait_released(Path(entry.source)):
        print(f"cryptfs: {mountpoint}: unmounted, but its daemon has not ended yet",
              file=sys.stderr)


def cmd_passwd(args: argparse.Namespace) -> None:
    cipherdir = _cipherdir(args.cipherdir)
    _check_writable(cipherdir)
    keyfile, keys = _unlock(cipherdir, args)
    new = get_password(args.new_passfile, None, prompt="New password: ", confirm=True)
    slot = keyfile.unlocked_slot if keyfile.unlocked_slot is not None else keyfile.slots[0].slot_id
    keyfile.change_password(keys, slot, new)
    _save_keyfile(keyfile, cipherdir)
    keys.wipe()
    print(f"cryptfs: password of key slot {slot} changed")
    print(OLD_COPIES_WARNING)


# Printed after a password stops working: the master key is unchanged, so
# only the key file changed, and old copies of it still open everything.
OLD_COPIES_WARNING = (
    "cryptfs: copies of the key file made before this change (backups, snapshots, sync\n"
    "history) still open this cipher directory with the old password, because the\n"
    "master key does not change. Delete such copies; re-encrypting under a new master\n"
    "key (rekey) is not offered yet."
)


def _save_keyfile(keyfile: KeyFile, cipherdir: Path) -> None:
    for name in keyfile.save(cipherdir):
        print(f"cryptfs: deleted {name} (an old copy of the key file that still opened "
              "with passwords changed or removed since)")


def cmd_key(args: argparse.Namespace) -> None:
    cipherdir = _cipherdir(args.cipherdir)
    if args.key_command == "list":
        for line in _slot_lines(KeyFile.load(cipherdir)):
            print(line)
        return
    _check_writable(cipherdir)
    keyfile, keys = _unlock(cipherdir, args)
    if args.key_command == "add":
        new = get_password(args.new_passfile, None, prompt="New password: ", confirm=True)
        slot = keyfile.add_password(keys, new, _kdf(args), label=args.label)
        _save_keyfile(keyfile, cipherdir)
        print(f"cryptfs: added key slot {slot.slot_id}")
    else:
        if args.slot not in {s.slot_id for s in keyfile.slots}:
            raise UsageError(f"there is no key slot {args.slot}")
        try:
            keyfile.remove_slot(keys, args.slot)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        _save_keyfile(keyfile, cipherdir)
        print(f"cryptfs: removed key slot {args.slot}")
        print(OLD_COPIES_WARNING)
    keys.wipe()


def _slot_lines(keyfile: KeyFile) -> list[str]:
    lines = []
    for slot in keyfile.slots:
        k = slot.kdf
        cost = (f"{k.memory_kib // 1024} MiB, {k.iterations} passes, {k.lanes} lanes"
                if k.name == "argon2id" else f"N=2^{k.log2_n}, r={k.r}, p={k.p}")
        label = f" {slot.label!r}" if slot.label else ""
        lines.append(f"slot {slot.slot_id}: {slot.kind}{label}, {k.name} ({cost})")
    return lines


def cmd_info(args: argparse.Namespace) -> None:
    cipherdir = _cipherdir(args.cipherdir)
    keyfile = KeyFile.load(cipherdir)
    print(f"cipher directory: {os.path.abspath(cipherdir)}")
    print(f"format version:   {keyfile.version} (this cryptfs writes {FORMAT_VERSION})")
    print(f"feature flags:    {', '.join(keyfile.features) or 'none'}")
    print("contents:         AES-256-XTS, 4096-byte pages, per-file keys (HKDF-SHA512)"
          + (", HMAC-SHA256/128 tag per page" if keyfile.authenticated else ""))
    print("names:            AES-256-SIV, base64url, long names over 255 bytes hashed")
    for line in _slot_lines(keyfile):
        print(f"key {line}")
    choice = select_engine("auto")  # auto always has the userspace engine to fall back on
    print(f"engine here:      {choice.engine.describe()}; {choice.reason}")


def cmd_speed(args: argparse.Namespace) -> None:
    results = speed.run(args.seconds, args.dir)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    else:
        print(speed.report(results))



def _lock_for_fsck(cipherdir: Path, force: bool) -> MountLock:
    """A mounted directory changes while it is read: a file being written
    would be reported as damaged.  Refused before the password is asked
    for, unless ``force``."""
    try:
        return lock_for_check(cipherdir)
    except AlreadyMountedError as exc:
        if not force:
            raise AlreadyMountedError(f"{exc}; fsck --force checks it anyway") from exc
        log.warning("%s; checking it anyway (--force): files being changed may be "
                    "reported as damaged", exc)
        return MountLock(None)


def cmd_fsck(args: argparse.Namespace) -> None:
    cipherdir = _cipherdir(args.cipherdir)
    with _lock_for_fsck(cipherdir, args.force):
        _fsck(cipherdir, args)


def _fsck(cipherdir: Path, args: argparse.Namespace) -> None:
    keyfile, keys = _unlock(cipherdir, args)
    sessions = SessionCache(select_engine(args.engine).engine, keys)
    try:
        codec = ContentCodec(keys, sessions, keyfile.authenticated)
        checker = Checker(str(cipherdir), codec, NameCipher(keys),
                          MetadataCipher.for_features(keys, keyfile.features),
                          progress=not args.json and sys.stderr.isatty())
        problems = checker.run()
    finally:
        sessions.close()
        keys.wipe()
    if args.json:
        print(json.dumps({"problems": as_json(problems), "files": checker.progress.files,
                          "bytes": checker.progress.bytes}, indent=2))
    else:
        print_report(problems)
        print(f"cryptfs: checked {checker.progress.files} files, "
              f"{checker.progress.bytes} bytes: {len(problems) or 'no'} problems")
    if problems:
        raise ProblemsFound(f"{len(problems)} problems found in {cipherdir}")


def cmd_install_helpers(args: argparse.Namespace) -> None:
    """mount(8) finds helpers only in /sbin, and runs them with an empty PATH
    (so mount.fuse3 finds ``cryptfs`` only in the shell's default PATH)."""
    here = Path(sys.argv[0]).resolve().parent
    for target, link in ((here / "cryptfs", Path(args.bindir) / "cryptfs"),
                         (here / "mount.cryptfs", Path(args.sbindir) / "mount.cryptfs")):
        if not target.exists():
            raise UsageError(f"{target} not found (run this from the installed cryptfs)")
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
        print(f"cryptfs: {link} -> {target}")


# --- argument parsing ----------------------------------------------------------------


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
    init.set_defaults(func=cmd_init)

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
    mount.set_defaults(func=cmd_mount)

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
    _verbose_arg(fsck)
    fsck.set_defaults(func=cmd_fsck)

    info = sub.add_parser("info", help="format, key slots and engine (never key material)")
    info.add_argument("cipherdir")
    info.set_defaults(func=cmd_info)

    speed_cmd = sub.add_parser("speed", help="measure each crypto engine on this machine")
    speed_cmd.add_argument("--seconds", type=float, default=0.5, help="per figure (default 0.5)")
    speed_cmd.add_argument("--dir", help="where the test backing file goes (default: $TMPDIR)")
    speed_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    speed_cmd.set_defaults(func=cmd_speed)
    return top


def mount_helper_args(argv: list[str]) -> list[str]:
    """``SRC DIR [-o opts] [-f|-n|-s|-v]`` (mount.fuse3 and mount(8) helpers)
    into ``mount`` subcommand arguments."""
    positional, options = [], []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options.append(next(it, ""))
        elif arg.startswith("-o"):
            options.append(arg[2:])
        elif arg in ("-n", "-s", "-v"):  # no mtab / sloppy / verbose: nothing to do
            continue
        elif arg == "-f":
            options.append("foreground")
        elif arg == "-t":
            next(it, None)
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError("usage: cryptfs CIPHERDIR MOUNTPOINT [-o options]")
    parsed = parse_mount_options(",".join(options))
    out = ["mount", *positional]
    for key, value in parsed.values.items():
        out += [f"--{key}", value]
    flag_map = {"ro": "--ro", "allow_other": "--allow-other", "recovery": "--recovery",
                "foreground": "--foreground", "no_xattr": "--no-xattr",
                "nonempty": "--nonempty"}
    out += [flag_map[f] for f in sorted(parsed.flags) if f in flag_map]
    return out + [f"--fuse-flag={flag}" for flag in sorted(parsed.fuse)]


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
