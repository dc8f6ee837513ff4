"""``cryptfs path encrypt|decrypt``: the map between plaintext and backing
paths (tools/pathmap.py).

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

from cryptfs.cli.common import cipherdir_arg, unlock
from cryptfs.names.filenames import NameCipher
from cryptfs.tools.pathmap import Component, PathMap


def cmd_path(args: argparse.Namespace) -> None:
    cipherdir = cipherdir_arg(args.cipherdir)
    keyfile, keys = unlock(cipherdir, args)  # reads only: no lock, no write
    try:
        pathmap = PathMap(str(cipherdir), NameCipher.for_features(keys, keyfile.features))
        steps = pathmap.encrypt(args.path) if args.path_command == "encrypt" \
            else pathmap.decrypt(args.path)
    finally:
        keys.wipe()
    if args.json:
        print(json.dumps(as_json(steps), indent=2))
    elif args.path_command == "encrypt":
        _print(backing_of(steps), *[s.sidecar for s in steps if s.sidecar is not None])
    else:
        _print(plaintext_of(steps))


def backing_of(steps: list[Component]) -> str:
    return steps[-1].backing if steps else "."


def plaintext_of(steps: list[Component]) -> str:
    return steps[-1].plaintext if steps else "/"


def as_json(steps: list[Component]) -> dict:
    return {"plaintext": plaintext_of(steps), "backing": backing_of(steps),
            "sidecars": [s.sidecar for s in steps if s.sidecar is not None],
            "components": [{"plaintext": s.plaintext, "backing": s.backing,
                            "sidecar": s.sidecar} for s in steps]}


def _print(*lines: str) -> None:
    out = sys.stdout.buffer
    for line in lines:
        out.write(os.fsencode(line) + b"\n")
    out.flush()
