"""Reverse mode's derivations: what forward mode draws at random, derived.

A reverse mount shows a cipher directory computed from a plaintext tree,
and must show the same bytes on every mount and every machine so that
incremental backup tools copy only what changed.  So the three values
forward mode picks at random come from the master key and the entry's place
(docs/format.md, "Reverse mode"):

- the root directory IV: HKDF-SHA512 with its own label (other directories
  use the convergent IVs of ``names/filenames.derive_diriv``);
- a regular file's ID: HMAC-SHA256 under its own HKDF subkey of a label, the
  parent directory's IV and the plaintext name, cut to 16 bytes.  One ID per
  *path*: two hard links to one inode get two IDs, never two inodes one ID
  (the inode-number reuse of gocryptfs issue 398 cannot happen);
- an xattr value's SIV nonce: HMAC-SHA256 under a third subkey of a label,
  the owner (kind and identity, length-prefixed), the stored name, a zero
  byte (no xattr name holds one) and the value.

Every value is a pure function of key and input; nothing here is secret
beyond the key.
"""

from __future__ import annotations

import hmac
import struct

from cryptfs.keys.hierarchy import FILE_ID_LEN, KeyRing, hkdf_sha512

DIRIV_LEN = 16
NONCE_LEN = 16

# HKDF info labels and HMAC input labels.  Part of the format: never change one.
INFO_REVERSE_ROOT_IV = b"cryptfs v1 reverse root directory iv"
INFO_REVERSE_FILE_ID = b"cryptfs v1 reverse file id key"
INFO_REVERSE_XATTR_NONCE = b"cryptfs v1 reverse xattr nonce key"
FILE_ID_LABEL = b"cryptfs v1 reverse file id"
XATTR_NONCE_LABEL = b"cryptfs v1 reverse xattr nonce"


class ReverseDerivation:
    """The derived root IV, file IDs and xattr nonces of one key."""

    def __init__(self, keys: KeyRing) -> None:
        master = keys.master_key
        self.root_iv = hkdf_sha512(master, INFO_REVERSE_ROOT_IV, DIRIV_LEN)
        self._file_id_key = hkdf_sha512(master, INFO_REVERSE_FILE_ID, 32)
        self._nonce_key = hkdf_sha512(master, INFO_REVERSE_XATTR_NONCE, 32)

    def file_id(self, parent_iv: bytes, name: bytes) -> bytes:
        """The file ID of the regular file ``name`` in the directory whose IV
        is ``parent_iv``.  Label and IV have fixed lengths, so the input is
        unambiguous."""
        if len(parent_iv) != DIRIV_LEN:
            raise ValueError(f"directory IV must be {DIRIV_LEN} bytes")
        if not name or b"/" in name or b"\x00" in name:
            raise ValueError("not a file name")
        msg = FILE_ID_LABEL + parent_iv + name
        return hmac.digest(self._file_id_key, msg, "sha256")[:FILE_ID_LEN]

    def xattr_nonce(self, owner: bytes, stored_name: bytes, value: bytes) -> bytes:
        """The nonce of an xattr value; ``owner`` is the bound owner's kind
        followed by its identity, or empty in the version-1 encoding."""
        if b"\x00" in stored_name:
            raise ValueError("xattr name contains NUL")
        msg = (XATTR_NONCE_LABEL + struct.pack(">I", len(owner)) + owner
               + stored_name + b"\x00" + value)
        return hmac.digest(self._nonce_key, msg, "sha256")[:NONCE_LEN]

    def __repr__(self) -> str:  # never show key bytes
        return "<ReverseDerivation (keys hidden)>"


# Where ``cryptfs init --reverse PLAINDIR`` puts the key file by default: a
# hidden file in PLAINDIR that the view never shows (it shows its bytes as
# ``cryptfs.conf``).
REVERSE_KEYFILE_NAME = ".cryptfs.reverse.conf"
