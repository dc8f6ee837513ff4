"""``cryptfs path encrypt|decrypt``: the map between plaintext and backing
paths (tools/pathmap.py), of a cipher directory or of the reverse view of
a plaintext directory.

With ``--passfile``, ``--extpass`` or ``--recovery`` the map is computed
here; without, the running mount of the directory answers through its
control socket (daemon/ctlsock.py), and only where none does is the
password asked for on the terminal (``--via-mount``: the mount or an
error, never a prompt).

Text output is for scripts: ``encrypt`` prints the backing path, then the
sidecar of every long-named component on lines of their own (together, the
files to restore from a backup); ``decrypt`` prints the plaintext path.
``--json`` gives every component.  Paths are raw bytes, as the filesystem
has them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cryptfs.cli.common import cipherdir_arg, unlock_keyfile
from cryptfs.cli.reverse import load_reverse_keyfile
from cryptfs.daemon.ctlsock import NoMountError, request
from cryptfs.errors import UsageError
from cryptfs.keys.keyfile import KEYFILE_NAME, KeyFile
from cryptfs.keys.reverse import REVERSE_KEYFILE_NAME
from cryptfs.names.filenames import NameCipher
from cryptfs.tools.pathmap import PathMap, ReversePathMap, mapper_of


def cmd_path(args: argparse.Namespace) -> None:
    directory = cipherdir_arg(args.cipherdir)
    config = reverse_config(directory, args)
    if _with_password(args):
        answer = _offline(directory, config, args)
    else:
        try:
            answer = request(directory, args.path_command, args.path)
        except NoMountError:
            if args.via_mount or not sys.stdin.isatty():
                raise
            answer = _offline(directory, config, args)  # asks for the password
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.path_command == "encrypt":
        _print(answer["backing"], *answer["sidecars"])
    else:
        _print(answer["plaintext"])


def reverse_config(directory: Path, args: argparse.Namespace) -> Path | None:
    """The reverse key file, if ``directory`` is the plaintext side of a
    reverse configuration: ``--config FILE`` (with ``--reverse``), or
    ``.cryptfs.reverse.conf`` in a directory that is no cipher directory."""
    if args.config is not None:
        if not args.reverse:
            raise UsageError("--config goes with --reverse (a forward key file is "
                             f"always {KEYFILE_NAME} in the cipher directory)")
        return Path(args.config)
    hidden = directory / REVERSE_KEYFILE_NAME
    if args.reverse or (hidden.is_file() and not (directory / KEYFILE_NAME).exists()):
        return hidden
    return None


def _with_password(args: argparse.Namespace) -> bool:
    given = bool(args.passfile or args.extpass or args.recovery)
    if given and args.via_mount:
        raise UsageError("--via-mount asks the running mount: give no password with it")
    return given


def _offline(directory: Path, config: Path | None, args: argparse.Namespace) -> dict:
    keyfile = KeyFile.load(directory) if config is None else load_reverse_keyfile(config)
    keys = unlock_keyfile(keyfile, args)  # reads only: no lock, no write
    try:
        if config is None:
            pathmap = PathMap(str(directory), NameCipher.for_features(keys, keyfile.features))
        else:
            pathmap = ReversePathMap(str(directory), keys, config=str(config))
        return mapper_of(pathmap)(args.path_command, args.path)
    finally:
        keys.wipe()


def _print(*lines: str) -> None:
    out = sys.stdout.buffer
    for line in lines:
        out.write(os.fsencode(line) + b"\n")
    out.flush()
