"""The ``cryptfs`` command.  Only ``main()`` exits: expected errors print one
line and exit with their ``ExitCode``; anything else is a bug and prints a
traceback (exit ``INTERNAL``)."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
import traceback
from pathlib import Path

import trio

from cryptfs import __version__
from cryptfs.daemonize import detach
from cryptfs.engines import ENGINE_NAMES
from cryptfs.errors import CryptfsError, ExitCode
from cryptfs.fs.ops import MountOptions
from cryptfs.keyfile import KEYFILE_NAME, KdfParams, KeyFile
from cryptfs.log import setup_logging
from cryptfs.mount import build_stack, fuse_options, mounted, serve
from cryptfs.names import DIRIV_NAME, create_diriv

log = logging.getLogger("cryptfs")


class UsageError(CryptfsError):
    exit_code = ExitCode.USAGE


class CipherDirError(CryptfsError):
    exit_code = ExitCode.CIPHERDIR


def read_password(passfile: str | None, confirm: bool = False) -> bytes:
    if passfile is not None:
        try:
            with open(passfile, "rb") as f:
                line = f.readline()
        except OSError as exc:
            raise UsageError(f"cannot read the password file {passfile}: {exc.strerror}") from exc
        password = line.rstrip(b"\r\n")
    else:
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask for the password: use --passfile")
        password = getpass.getpass("Password: ").encode()
        if confirm and getpass.getpass("Repeat: ").encode() != password:
            raise UsageError("the passwords do not match")
    if not password:
        raise UsageError("the password is empty")
    return password


def cmd_init(args: argparse.Namespace) -> None:
    cipherdir = Path(args.cipherdir)
    if not cipherdir.is_dir():
        raise CipherDirError(f"{cipherdir} is not a directory")
    if (cipherdir / KEYFILE_NAME).exists():
        raise CipherDirError(f"{cipherdir} is already a cryptfs cipher directory")
    if any(cipherdir.iterdir()) and not args.force:
        raise CipherDirError(f"{cipherdir} is not empty (use --force to initialise it anyway)")
    password = read_password(args.passfile, confirm=True)
    kdf = KdfParams.argon2id(memory_kib=args.argon2_memory * 1024,
                             iterations=args.argon2_passes)
    keyfile, keys = KeyFile.create(password, kdf)
    if not (cipherdir / DIRIV_NAME).exists():
        fd = os.open(cipherdir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            create_diriv(fd)
        finally:
            os.close(fd)
    keyfile.save(cipherdir)
    keys.wipe()
    print(f"cryptfs: initialised {cipherdir}")


def cmd_mount(args: argparse.Namespace) -> None:
    cipherdir, mountpoint = Path(args.cipherdir), Path(args.mountpoint)
    if not cipherdir.is_dir():
        raise CipherDirError(f"cipher directory {cipherdir} does not exist")
    if not mountpoint.is_dir():
        raise UsageError(f"mount point {mountpoint} does not exist or is not a directory")
    keyfile = KeyFile.load(cipherdir)
    keys = keyfile.unlock(read_password(args.passfile))
    options = MountOptions(read_only=args.ro)
    stack = build_stack(cipherdir, keys, args.engine, options)
    fsname = args.fsname or os.path.abspath(cipherdir)
    with mounted(stack, mountpoint, fuse_options(options, fsname, args.allow_other)):
        log.info("mounted %s on %s", cipherdir, mountpoint)
        if not args.foreground:
            detach()
        trio.run(serve)
    keys.wipe()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="cryptfs", description="An encrypted FUSE filesystem.")
    top.add_argument("--version", action="version", version=f"cryptfs {__version__}")
    top.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = top.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a new cipher directory")
    init.add_argument("cipherdir")
    init.add_argument("--passfile", help="read the password from the first line of FILE")
    init.add_argument("--force", action="store_true", help="initialise a non-empty directory")
    init.add_argument("--argon2-memory", type=int, default=256, metavar="MIB",
                      help="Argon2id memory cost in MiB (default 256)")
    init.add_argument("--argon2-passes", type=int, default=3, metavar="N",
                      help="Argon2id passes (default 3)")
    init.set_defaults(func=cmd_init)

    mount = sub.add_parser("mount", help="mount a cipher directory")
    mount.add_argument("cipherdir")
    mount.add_argument("mountpoint")
    mount.add_argument("--passfile", help="read the password from the first line of FILE")
    mount.add_argument("--engine", choices=ENGINE_NAMES, default="auto")
    mount.add_argument("--ro", action="store_true", help="mount read-only")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users access the mount (with permission checks)")
    mount.add_argument("--fsname", help="name shown in /proc/mounts")
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="stay in the foreground and log to stderr")
    mount.set_defaults(func=cmd_mount)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.debug)
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


if __name__ == "__main__":
    sys.exit(main())
