"""The key hierarchy: every key cryptfs uses is derived from one master key.

All subkeys come from HKDF-SHA512 (RFC 5869) with the master key as input
keying material, an empty salt, and a distinct ``info`` label per purpose, so
no two purposes can ever share a key (the same scheme fscrypt v2 uses for its
per-file keys).  See docs/format.md, "Key hierarchy".
"""

from __future__ import annotations

import resource

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from cryptfs.lowlevel.linux import mlock, set_undumpable

MASTER_KEY_LEN = 32
FILE_ID_LEN = 16

# HKDF info labels.  Part of the on-disk format: never change one.
INFO_CONTENT = b"cryptfs v1 content key\x00"  # followed by the 16-byte file ID
INFO_HEADER = b"cryptfs v1 header mac key"
INFO_NAMES = b"cryptfs v1 filename key"
INFO_METADATA = b"cryptfs v1 metadata key"
INFO_KEYFILE_MAC = b"cryptfs v1 key file mac key"
INFO_PAGE_TAG = b"cryptfs v1 page tag key"
INFO_DIRIV = b"cryptfs v1 directory iv key"  # convergent directory IVs
INFO_SYMLINK_NONCE = b"cryptfs v1 symlink nonce key"  # convergent symlink targets


def hkdf_sha512(ikm: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA512 with an empty salt: the one derivation all subkeys use."""
    return HKDF(algorithm=hashes.SHA512(), length=length, salt=None, info=info).derive(ikm)


class KeyRing:
    """The unlocked master key and the fixed subkeys derived from it.

    Per-file content keys are derived on demand (they depend on the file ID).
    ``wipe()`` overwrites what Python lets us overwrite; ``bytes`` copies that
    ``cryptography`` makes internally cannot be reached, which is a known limit
    of a Python implementation (documented in the README's security model).
    """

    def __init__(self, master_key: bytes | bytearray) -> None:
        if len(master_key) != MASTER_KEY_LEN:
            raise ValueError(f"master key must be {MASTER_KEY_LEN} bytes")
        self._master = bytearray(master_key)
        self.lock_memory()
        master = bytes(self._master)
        self.header_key = hkdf_sha512(master, INFO_HEADER, 32)
        self.name_key = hkdf_sha512(master, INFO_NAMES, 64)
        self.metadata_key = hkdf_sha512(master, INFO_METADATA, 64)
        self.keyfile_mac_key = hkdf_sha512(master, INFO_KEYFILE_MAC, 32)
        self.page_tag_key = hkdf_sha512(master, INFO_PAGE_TAG, 32)  # authenticated mode
        # feature convergent-dirivs (docs/format.md §5.1, §6.1)
        self.diriv_key = hkdf_sha512(master, INFO_DIRIV, 32)
        self.symlink_nonce_key = hkdf_sha512(master, INFO_SYMLINK_NONCE, 32)
        # HKDF is Extract then Expand (RFC 5869); the Extract step is the
        # same for every file, so it is done once and each file's key costs
        # one Expand (half the work, same bytes as ``hkdf_sha512``).
        self._prk = HKDF.extract(hashes.SHA512(), None, master)

    @property
    def master_key(self) -> bytes:
        return bytes(self._master)

    def content_key(self, file_id: bytes) -> bytes:
        """The 64-byte AES-256-XTS key of one file (data key, then tweak key)."""
        if len(file_id) != FILE_ID_LEN:
            raise ValueError(f"file ID must be {FILE_ID_LEN} bytes")
        return HKDFExpand(hashes.SHA512(), 64, INFO_CONTENT + file_id).derive(self._prk)

    def lock_memory(self) -> bool:
        """mlock the master key's buffer so it is never written to swap (best
        effort; call again after fork, which does not inherit locks)."""
        return mlock(self._master)

    def wipe(self) -> None:
        for i in range(len(self._master)):
            self._master[i] = 0

    def __repr__(self) -> str:  # never show key bytes, not even in a traceback
        return "<KeyRing (keys hidden)>"




def protect_process() -> None:
    """Keep key material out of core dumps: no core file (RLIMIT_CORE 0) and
    not dumpable (which also stops non-root ptrace of the daemon)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    set_undumpable()
