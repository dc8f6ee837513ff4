"""The key file (``cryptfs.conf``): format parameters and wrapped master key.

The master key is stored only wrapped: each *key slot* derives a key-encryption
key from a secret (Argon2id or scrypt over a password) and seals the master
key with AES-256-GCM.  The slot's associated data is the canonical JSON of
the file's format parameters plus the slot's own parameters, so lowering the
KDF cost or switching a feature flag breaks that slot.  The whole file is also
MAC'd under a key derived from the master key (tampering with any field,
including other slots, is caught once the key is unlocked) and carries a plain
SHA-256 checksum, which tells accidental damage apart from a wrong password.

The file is JSON (human-inspectable, like gocryptfs.conf), written atomically
(temporary file, fsync, rename, fsync of the directory) with mode 0600.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from cryptfs.errors import (
    CipherDirError,
    KeyFileCorruptError,
    KeyFileMissingError,
    KeyFileTamperedError,
    UnsupportedFeatureError,
    UnsupportedKdfError,
    UnsupportedVersionError,
    WrongPasswordError,
)
from cryptfs.keys.hierarchy import MASTER_KEY_LEN, KeyRing

KEYFILE_NAME = "cryptfs.conf"
FORMAT_NAME = "cryptfs-keyfile"
FORMAT_VERSION = 1
# Feature flags this release understands.  A key file may require only these.
FEATURE_AUTHENTICATED = "authenticated"  # page tags on every file (format.md §4.6)
FEATURE_BOUND_METADATA = "bound-metadata"  # targets and xattrs sealed to their entry (format.md §2)
# Directory IVs (and symlink nonces) derived from their place, so two
# machines that make the same path write the same bytes (format.md §5.1)
FEATURE_CONVERGENT_DIRIVS = "convergent-dirivs"
KNOWN_FEATURES: frozenset[str] = frozenset(
    {FEATURE_BOUND_METADATA, FEATURE_AUTHENTICATED, FEATURE_CONVERGENT_DIRIVS})
# What ``cryptfs init`` writes (a key file without them is an older format,
# still read and written in its own encoding); ``init --authenticated`` adds
# FEATURE_AUTHENTICATED.
NEW_FEATURES: tuple[str, ...] = (FEATURE_BOUND_METADATA, FEATURE_CONVERGENT_DIRIVS)
MAX_KEYFILE_BYTES = 1 << 20

# The fixed content and name parameters of format version 1 (bound into
# every slot's associated data and the file MAC; see docs/format.md).
CONTENT_PARAMS = {"cipher": "aes-256-xts", "page_size": 4096, "header_size": 4096}
NAME_PARAMS = {"cipher": "aes-256-siv", "encoding": "base64url", "longname_max": 255}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise KeyFileCorruptError(f"key file: {what} is not a string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise KeyFileCorruptError(f"key file: {what} is not valid base64") from exc


def refuse_unknown_fields(obj: dict[str, Any], known: set[str], where: str) -> None:
    """Fields outside the MAC and the slots' associated data must not exist:
    a later version that gave one a meaning would read it unauthenticated.
    New meaning comes with a feature flag or a new version instead."""
    unknown = sorted(set(obj) - known)
    if unknown:
        raise UnsupportedFeatureError(
            f"key file: {where} has fields this cryptfs does not know: {', '.join(unknown)} "
            "(written by a newer cryptfs, or edited)")


def canonical_json(obj: Any) -> bytes:
    """The byte string that checksums, MACs and associated data are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# --- KDFs -------------------------------------------------------------------


@dataclass(frozen=True)
class KdfParams:
    """Parameters of a password KDF, as stored in a slot."""

    name: str  # "argon2id" or "scrypt"
    salt: bytes
    # argon2id
    memory_kib: int = 0
    iterations: int = 0
    lanes: int = 0
    # scrypt
    log2_n: int = 0
    r: int = 0
    p: int = 0

    @classmethod
    def argon2id(
        cls, memory_kib: int = 262144, iterations: int = 3, lanes: int = 4
    ) -> KdfParams:
        """Default cost: 256 MiB, 3 passes, 4 lanes, about 0.6 s on the
        reference machine (2 cores, AES-NI, 2026)."""
        return cls("argon2id", secrets.token_bytes(32), memory_kib, iterations, lanes)

    @classmethod
    def scrypt(cls, log2_n: int = 17, r: int = 8, p: int = 1) -> KdfParams:
        return cls("scrypt", secrets.token_bytes(32), log2_n=log2_n, r=r, p=p)

    def to_json(self) -> dict[str, Any]:
        if self.name == "argon2id":
            return {
                "name": self.name,
                "salt": _b64(self.salt),
                "memory_kib": self.memory_kib,
                "iterations": self.iterations,
                "lanes": self.lanes,
            }
        return {"name": self.name, "salt": _b64(self.salt), "log2_n": self.log2_n,
                "r": self.r, "p": self.p}

    @classmethod
    def from_json(cls, obj: Any) -> KdfParams:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise KeyFileCorruptError("key file: a slot's kdf is malformed")
        name = obj["name"]
        if name in _KDF_FIELDS:
            refuse_unknown_fields(obj, _KDF_FIELDS[name], f"the {name} parameters")
        salt = _unb64(obj.get("salt"), "kdf salt")
        if len(salt) < 16:
            raise KeyFileCorruptError("key file: kdf salt is shorter than 16 bytes")
        if name == "argon2id":
            mem, it, lanes = (_int(obj, k) for k in ("memory_kib", "iterations", "lanes"))
            # Bounds keep a hostile key file from asking for absurd work or memory.
            if not (1 <= lanes <= 64 and 8 * lanes <= mem <= 4 << 20 and 1 <= it <= 64):
                raise UnsupportedKdfError(
                    f"argon2id parameters out of range (memory {mem} KiB, "
                    f"{it} iterations, {lanes} lanes)"
                )
            return cls(name, salt, memory_kib=mem, iterations=it, lanes=lanes)
        if name == "scrypt":
            log2_n, r, p = (_int(obj, k) for k in ("log2_n", "r", "p"))
            if not (10 <= log2_n <= 22 and 1 <= r <= 32 and 1 <= p <= 16):
                raise UnsupportedKdfError(
                    f"scrypt parameters out of range (log2 N {log2_n}, r {r}, p {p})"
                )
            return cls(name, salt, log2_n=log2_n, r=r, p=p)
        raise UnsupportedKdfError(f"key slot uses the unsupported KDF {name!r}")

    def derive(self, secret: bytes) -> bytes:
        """The 32-byte key-encryption key for ``secret``."""
        if self.name == "argon2id":
            kdf = Argon2id(salt=self.salt, length=32, iterations=self.iterations,
                           lanes=self.lanes, memory_cost=self.memory_kib)
            return kdf.derive(secret)
        kdf = Scrypt(salt=self.salt, length=32, n=1 << self.log2_n, r=self.r, p=self.p)
        return kdf.derive(secret)


_KDF_FIELDS = {"argon2id": {"name", "salt", "memory_kib", "iterations", "lanes"},
               "scrypt": {"name", "salt", "log2_n", "r", "p"}}


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise KeyFileCorruptError(f"key file: kdf {key} is not an integer")
    return value


# --- slots ------------------------------------------------------------------


_SLOT_FIELDS = {"id", "kind", "label", "kdf", "nonce", "wrapped_key"}
_FILE_FIELDS = {"format", "version", "features", "content", "names", "slots", "mac"}


@dataclass(frozen=True)
class KeySlot:
    """One way to unlock the master key (a password today; key files later)."""

    slot_id: int
    kind: str  # "password"
    kdf: KdfParams
    nonce: bytes
    wrapped_key: bytes
    label: str = ""

    def public_json(self) -> dict[str, Any]:
        """The slot without its wrapped key: what its associated data covers."""
        return {"id": self.slot_id, "kind": self.kind, "label": self.label,
                "kdf": self.kdf.to_json(), "nonce": _b64(self.nonce)}

    def to_json(self) -> dict[str, Any]:
        return {**self.public_json(), "wrapped_key": _b64(self.wrapped_key)}

    @classmethod
    def from_json(cls, obj: Any) -> KeySlot:
        if not isinstance(obj, dict):
            raise KeyFileCorruptError("key file: a slot is not an object")
        refuse_unknown_fields(obj, _SLOT_FIELDS, "a slot")
        slot_id, kind, label = obj.get("id"), obj.get("kind"), obj.get("label", "")
        if not isinstance(slot_id, int) or not isinstance(kind, str) or not isinstance(label, str):
            raise KeyFileCorruptError("key file: a slot lacks id, kind or label")
        nonce = _unb64(obj.get("nonce"), "slot nonce")
        wrapped = _unb64(obj.get("wrapped_key"), "wrapped key")
        if len(nonce) != 12 or len(wrapped) != MASTER_KEY_LEN + 16:
            raise KeyFileCorruptError("key file: a slot's nonce or wrapped key has the wrong size")
        return cls(slot_id, kind, KdfParams.from_json(obj.get("kdf")), nonce, wrapped, label)


# --- the file -----------------------------------------------------------------


@dataclass
class KeyFile:
    """A parsed key file.  ``unlock`` turns a password into a ``KeyRing``."""

    slots: list[KeySlot]
    features: list[str] = field(default_factory=list)
    version: int = FORMAT_VERSION
    mac: bytes = b""
    unlocked_slot: int | None = None  # which slot the last unlock() opened

    # -- associated data and MACs --

    def _params(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": self.version, "features": self.features,
                "content": CONTENT_PARAMS, "names": NAME_PARAMS}

    def _slot_ad(self, public_slot: dict[str, Any]) -> bytes:
        return canonical_json({"params": self._params(), "slot": public_slot})

    def _body(self) -> dict[str, Any]:
        return {**self._params(), "slots": [s.to_json() for s in self.slots]}

    def _compute_mac(self, keys: KeyRing) -> bytes:
        return hmac.new(keys.keyfile_mac_key, canonical_json(self._body()), "sha256").digest()

    # -- creating and changing --

    @property
    def authenticated(self) -> bool:
        return FEATURE_AUTHENTICATED in self.features

    @classmethod
    def create(cls, password: bytes, kdf: KdfParams | None = None,
               features: Sequence[str] = NEW_FEATURES) -> tuple[KeyFile, KeyRing]:
        """A new key file with a fresh random master key and one password
        slot, requiring ``features`` (bound into the slot and the MAC;
        ``features=()`` makes a version-1 directory, as older cryptfs did)."""
        keys = KeyRing(secrets.token_bytes(MASTER_KEY_LEN))
        keyfile = cls(slots=[], features=sorted(features))
        keyfile.add_password(keys, password, kdf)
        return keyfile, keys

    def add_password(
        self, keys: KeyRing, password: bytes, kdf: KdfParams | None = None, label: str = ""
    ) -> KeySlot:
        slot_id = max((s.slot_id for s in self.slots), default=-1) + 1
        slot = self._wrap(keys, slot_id, password, kdf or KdfParams.argon2id(), label)
        self.slots.append(slot)
        self.mac = self._compute_mac(keys)
        return slot

    def _wrap(self, keys: KeyRing, slot_id: int, password: bytes, kdf: KdfParams,
              label: str) -> KeySlot:
        nonce = secrets.token_bytes(12)
        public = KeySlot(slot_id, "password", kdf, nonce, b"", label).public_json()
        kek = kdf.derive(password)
        wrapped = AESGCM(kek).encrypt(nonce, keys.master_key, self._slot_ad(public))
        return KeySlot(slot_id, "password", kdf, nonce, wrapped, label)

    def change_password(self, keys: KeyRing, slot_id: int, password: bytes,
                        kdf: KdfParams | None = None) -> None:
        """Re-wrap the master key in slot ``slot_id`` under a new password
        (fresh salt and nonce; same id, label and KDF cost unless given)."""
        index = next(i for i, s in enumerate(self.slots) if s.slot_id == slot_id)
        old = self.slots[index]
        if kdf is None:
            kdf = KdfParams(old.kdf.name, secrets.token_bytes(32), old.kdf.memory_kib,
                            old.kdf.iterations, old.kdf.lanes, old.kdf.log2_n, old.kdf.r,
                            old.kdf.p)
        self.slots[index] = self._wrap(keys, slot_id, password, kdf, old.label)
        self.mac = self._compute_mac(keys)

    def remove_slot(self, keys: KeyRing, slot_id: int) -> None:
        remaining = [s for s in self.slots if s.slot_id != slot_id]
        if len(remaining) == len(self.slots):
            raise KeyError(slot_id)
        if not remaining:
            raise ValueError("refusing to remove the last key slot")
        self.slots = remaining
        self.mac = self._compute_mac(keys)

    # -- unlocking --

    def unlock(self, password: bytes) -> KeyRing:
        """Try every password slot.  Raises ``WrongPasswordError`` if none opens."""
        unsupported: UnsupportedKdfError | None = None
        for slot in self.slots:
            if slot.kind != "password":
                continue
            try:
                kek = slot.kdf.derive(password)
            except (ValueError, MemoryError) as exc:  # e.g. memory the machine lacks
                unsupported = UnsupportedKdfError(
                    f"cannot run the KDF of slot {slot.slot_id}: {exc}"
                )
                continue
            try:
                master = AESGCM(kek).decrypt(slot.nonce, slot.wrapped_key,
                                             self._slot_ad(slot.public_json()))
            except InvalidTag:
                continue
            keys = self.verify(master)
            self.unlocked_slot = slot.slot_id
            return keys
        if unsupported is not None:
            raise unsupported
        raise WrongPasswordError("wrong password")

    def verify(self, master_key: bytes) -> KeyRing:
        """Check the file MAC with a candidate master key (also how a recovery
        code, which is the master key itself, is checked)."""
        keys = KeyRing(master_key)
        if not hmac.compare_digest(self._compute_mac(keys), self.mac):
            keys.wipe()
            raise KeyFileTamperedError(
                "the key file's authenticated fields were modified (or this key "
                "does not belong to it)"
            )
        return keys

    # -- serialisation --

    def to_bytes(self) -> bytes:
        body = {**self._body(), "mac": _b64(self.mac)}
        body["checksum"] = hashlib.sha256(canonical_json(body)).hexdigest()
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyFile:
        """Parse and check a key file.  Every failure is a typed ``KeyFileError``."""
        if len(data) > MAX_KEYFILE_BYTES:
            raise KeyFileCorruptError("key file is implausibly large")
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise KeyFileCorruptError("key file is not valid JSON (truncated or damaged)") from exc
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise KeyFileCorruptError("not a cryptfs key file (missing format marker)")
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise KeyFileCorruptError("key file: version is not an integer")
        if version != FORMAT_VERSION:
            raise UnsupportedVersionError(
                f"key file format version {version} is not supported by this cryptfs "
                f"(it reads version {FORMAT_VERSION}); upgrade cryptfs"
            )
        checksum = obj.pop("checksum", None)
        if checksum != hashlib.sha256(canonical_json(obj)).hexdigest():
            raise KeyFileCorruptError("key file checksum mismatch: the file is damaged")
        refuse_unknown_fields(obj, _FILE_FIELDS, "the file")
        features = obj.get("features")
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise KeyFileCorruptError("key file: features is not a list of strings")
        unknown = sorted(set(features) - KNOWN_FEATURES)
        if unknown:
            raise UnsupportedFeatureError(
                f"key file requires features this cryptfs does not know: {', '.join(unknown)}"
            )
        if obj.get("content") != CONTENT_PARAMS or obj.get("names") != NAME_PARAMS:
            raise UnsupportedFeatureError("key file asks for content or name parameters "
                                          "this cryptfs does not implement")
        slots_json = obj.get("slots")
        if not isinstance(slots_json, list) or not slots_json:
            raise KeyFileCorruptError("key file has no key slots")
        slots = [KeySlot.from_json(s) for s in slots_json]
        if len({s.slot_id for s in slots}) != len(slots):
            raise KeyFileCorruptError("key file: duplicate slot ids")
        mac = _unb64(obj.get("mac"), "mac")
        return cls(slots=slots, features=features, version=version, mac=mac)

    @classmethod
    def load(cls, cipherdir: Path) -> KeyFile:
        return cls.read(Path(cipherdir) / KEYFILE_NAME,
                        missing=f"{cipherdir} is not a cryptfs cipher directory (no "
                                f"{KEYFILE_NAME}); run 'cryptfs init' first")

    @classmethod
    def read(cls, path: Path, missing: str) -> KeyFile:
        """The key file at ``path`` (bounded read); ``missing``: the error
        message when there is none."""
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_KEYFILE_BYTES + 1)
        except FileNotFoundError as exc:
            raise KeyFileMissingError(missing) from exc
        except OSError as exc:
            raise KeyFileMissingError(f"cannot read {path}: {exc.strerror}") from exc
        return cls.from_bytes(data)

    def save(self, cipherdir: Path) -> list[str]:
        """Write atomically, then delete every other copy of the key file in
        the cipher directory; returns the names deleted.

        No backup is kept: the atomic write already leaves either the old or
        the new file after a crash, and a copy beside it would keep opening
        with a removed or changed password (and travel wherever the cipher
        directory is synced).  The recovery code is the way back."""
        path = Path(cipherdir) / KEYFILE_NAME
        try:
            write_atomic(path, self.to_bytes())
        except OSError as exc:  # read-only, full, ...: the old or the new file, never a mix
            raise CipherDirError(f"cannot write the key file in {cipherdir}: "
                                 f"{exc.strerror}") from exc
        return remove_stale_copies(Path(cipherdir))


STALE_BACKUP = KEYFILE_NAME + ".bak"  # written by cryptfs before issue 12
_TMP_PREFIX = KEYFILE_NAME + ".tmp-"


def is_stale_copy(name: str) -> bool:
    return name == STALE_BACKUP or name.startswith(_TMP_PREFIX)


def remove_stale_copies(cipherdir: Path) -> list[str]:
    """Delete ``cryptfs.conf.bak`` (older versions kept the previous key file
    there, old slots and all) and temporary files an interrupted write left
    (they may hold slots removed since).  Returns the names deleted."""
    removed = []
    for entry in os.scandir(cipherdir):
        if is_stale_copy(entry.name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(entry.name)
    if removed:
        fsync_dir(cipherdir)
    return sorted(removed)


def fsync_dir(path: Path) -> None:
    dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or
    the new file, never a mix: temp file, fsync, rename, fsync directory."""
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # umask must not widen or narrow it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)

