"""``cryptfs fsck`` and ``speed``: the commands of tools/."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from cryptfs.cli.common import cipherdir_arg, environment_overrides, log, unlock
from cryptfs.content.codec import ContentCodec
from cryptfs.content.sessions import SessionCache
from cryptfs.daemon.lock import MountLock, lock_cipherdir, lock_for_check
from cryptfs.engines import select_engine
from cryptfs.errors import AlreadyMountedError, ProblemsFound, UsageError
from cryptfs.names.filenames import NameCipher
from cryptfs.names.metadata import MetadataCipher
from cryptfs.tools import repair, speed
from cryptfs.tools.fsck import Checker, as_json, print_report


def cmd_speed(args: argparse.Namespace) -> None:
    options = environment_overrides().engine
    results = speed.run(args.seconds, args.dir, options)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    else:
        print(speed.report(results, options))


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
    cipherdir = cipherdir_arg(args.cipherdir)
    if args.repair and args.force:
        raise UsageError("fsck --repair never runs while the directory is mounted (no --force)")
    # --repair writes: it holds the lock exclusively, as a mount does (no
    # mount and no other fsck meanwhile); a check shares it with other checks.
    lock = lock_cipherdir(cipherdir, read_only=False) if args.repair else \
        _lock_for_fsck(cipherdir, args.force)
    with lock:
        _fsck(cipherdir, args)


def _fsck(cipherdir: Path, args: argparse.Namespace) -> None:
    keyfile, keys = unlock(cipherdir, args)
    sessions = SessionCache(select_engine(args.engine, environment_overrides().engine).engine,
                            keys)
    try:
        codec = ContentCodec(keys, sessions, keyfile.authenticated)
        names = NameCipher.for_features(keys, keyfile.features)
        metadata = MetadataCipher.for_features(keys, keyfile.features)
        repaired = repair.Repair(str(cipherdir), names, metadata).run() if args.repair else []
        checker = Checker(str(cipherdir), codec, names, metadata,
                          progress=not args.json and sys.stderr.isatty())
        problems = checker.run()
    finally:
        sessions.close()
        keys.wipe()
    if args.json:
        report = {"problems": as_json(problems), "files": checker.progress.files,
                  "bytes": checker.progress.bytes}
        if args.repair:
            report["repaired"] = repair.as_json(repaired)
        print(json.dumps(report, indent=2))
    else:
        repair.print_repairs(repaired)
        print_report(problems)
        print(f"cryptfs: checked {checker.progress.files} files, "
              f"{checker.progress.bytes} bytes: {len(problems) or 'no'} problems")
    if problems:
        raise ProblemsFound(f"{len(problems)} problems found in {cipherdir}")
