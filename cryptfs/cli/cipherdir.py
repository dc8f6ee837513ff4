"""``cryptfs init``, ``passwd``, ``key`` and ``info``: a cipher directory
and its key file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cryptfs.cli.common import (
    check_writable,
    cipherdir_arg,
    environment_overrides,
    kdf_params,
    unlock,
)
from cryptfs.engines import EngineChoice, select_engine
from cryptfs.errors import CipherDirError, UsageError
from cryptfs.keys.hierarchy import KeyRing, protect_process
from cryptfs.keys.keyfile import (
    FEATURE_AUTHENTICATED,
    FORMAT_VERSION,
    KEYFILE_NAME,
    NEW_FEATURES,
    KeyFile,
)
from cryptfs.keys.password import get_password
from cryptfs.keys.recovery import encode_recovery_code
from cryptfs.names.filenames import DIRIV_NAME, create_diriv


def cmd_init(args: argparse.Namespace) -> None:
    cipherdir = cipherdir_arg(args.cipherdir)
    if (cipherdir / KEYFILE_NAME).exists():
        raise CipherDirError(f"{cipherdir} is already a cryptfs cipher directory")
    if any(cipherdir.iterdir()) and not args.force:
        raise CipherDirError(f"{cipherdir} is not empty (use --force to initialise it anyway)")
    check_writable(cipherdir)
    password = get_password(args.passfile, args.extpass, confirm=True)
    protect_process()
    features = (*NEW_FEATURES, FEATURE_AUTHENTICATED) if args.authenticated else NEW_FEATURES
    keyfile, keys = KeyFile.create(password, kdf_params(args), features)
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
        print_recovery_code(keys)
    keys.wipe()


def print_recovery_code(keys: KeyRing) -> None:
    print("\nRecovery code (unlocks this directory if the password is lost; anyone\n"
          "holding it can read everything: store it offline, then forget it):\n\n"
          f"    {encode_recovery_code(keys.master_key)}\n")


def cmd_passwd(args: argparse.Namespace) -> None:
    cipherdir = cipherdir_arg(args.cipherdir)
    check_writable(cipherdir)
    keyfile, keys = unlock(cipherdir, args)
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
    cipherdir = cipherdir_arg(args.cipherdir)
    if args.key_command == "list":
        for line in _slot_lines(KeyFile.load(cipherdir)):
            print(line)
        return
    check_writable(cipherdir)
    keyfile, keys = unlock(cipherdir, args)
    if args.key_command == "add":
        new = get_password(args.new_passfile, None, prompt="New password: ", confirm=True)
        slot = keyfile.add_password(keys, new, kdf_params(args), label=args.label)
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


def timing_line(choice: EngineChoice) -> str:
    """The kernel engine's figures against userspace, as the mount logs them."""
    if choice.timing is None:
        return ("none: the kernel engine is not used here" if choice.engine.name != "afalg"
                else "none: the timing failed (see -v)")
    advice = choice.timing.advice()
    return choice.timing.summary() + ("" if advice is None else
                                      "; far behind: --engine openssl is faster here")


def cmd_info(args: argparse.Namespace) -> None:
    cipherdir = cipherdir_arg(args.cipherdir)
    keyfile = KeyFile.load(cipherdir)
    print(f"cipher directory: {os.path.abspath(cipherdir)}")
    print(f"format version:   {keyfile.version} (this cryptfs writes {FORMAT_VERSION})")
    print(f"feature flags:    {', '.join(keyfile.features) or 'none'}")
    print("contents:         AES-256-XTS, 4096-byte pages, per-file keys (HKDF-SHA512)"
          + (", HMAC-SHA256/128 tag per page" if keyfile.authenticated else ""))
    print("names:            AES-256-SIV, base64url, long names over 255 bytes hashed")
    for line in _slot_lines(keyfile):
        print(f"key {line}")
    # auto always has the userspace engine to fall back on
    choice = select_engine("auto", environment_overrides().engine, compare=True)
    print(f"engine here:      {choice.engine.describe()}; {choice.reason}")
    print(f"engine timing:    {timing_line(choice)}")
