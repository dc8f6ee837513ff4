"""Exception hierarchy and the one table of process exit codes.

Lower layers raise these typed errors; only the FUSE edge turns them into
errno values and only ``main()`` turns them into exit codes.  Messages are
written for users and never contain key material.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes.  Documented for scripts: never renumber a value."""

    OK = 0  # success
    INTERNAL = 1  # a bug: a traceback was printed
    USAGE = 2  # bad command line or mount option
    CIPHERDIR = 10  # cipher directory missing, not initialised, not empty, or not writable
    KEYFILE = 11  # key file unreadable, corrupt, tampered or of an unsupported version
    PASSWORD = 12  # wrong password (or the key slot was modified)
    ENGINE = 13  # the requested crypto engine is not usable here
    MOUNT = 14  # the mount itself failed
    BUSY = 15  # unmount refused: a process has a file open or its working directory there
    MOUNTED = 16  # the cipher directory is already mounted on this machine (mount, fsck)
    FSCK_PROBLEMS = 20  # fsck found damage


class CryptfsError(Exception):
    """An expected error: ``main()`` prints its message in one line."""

    exit_code: ExitCode = ExitCode.INTERNAL


# --- key file -------------------------------------------------------------


class CipherDirError(CryptfsError):
    """The cipher directory is missing, not initialised, or unusable."""

    exit_code = ExitCode.CIPHERDIR


class PathNotFoundError(CipherDirError):
    """``cryptfs path``: a path names nothing the mount would show (missing,
    foreign, or under a directory whose names cannot be decrypted)."""


class KeyFileError(CryptfsError):
    exit_code = ExitCode.KEYFILE


class KeyFileMissingError(KeyFileError):
    exit_code = ExitCode.CIPHERDIR


class KeyFileCorruptError(KeyFileError):
    """Not parseable, truncated, or failed its checksum: damaged, not attacked."""


class KeyFileTamperedError(KeyFileError):
    """The key unlocked, but the file's authenticated fields do not match."""


class UnsupportedVersionError(KeyFileError):
    """Written by a newer (or unknown) cryptfs format."""


class UnsupportedKdfError(KeyFileError):
    """The key slot names a KDF (or parameters) this version cannot run."""


class UnsupportedFeatureError(KeyFileError):
    """The key file requires a feature flag this version does not know."""


class WrongPasswordError(CryptfsError):
    exit_code = ExitCode.PASSWORD


# --- engines --------------------------------------------------------------


class EngineUnavailableError(CryptfsError):
    """A requested crypto engine cannot run on this machine."""

    exit_code = ExitCode.ENGINE


class EngineError(CryptfsError):
    """The crypto engine failed on a request (for example a short kernel reply)."""


# --- file contents ----------------------------------------------------------


class ContentError(CryptfsError):
    """A backing file's contents cannot be trusted: the FUSE edge maps this to EIO."""


class HeaderCorruptError(ContentError):
    """The header page is short, lacks the magic, or has non-zero padding."""


class HeaderVersionError(ContentError):
    """The header names a content format version this release does not know."""


class HeaderAuthError(ContentError):
    """The header MAC does not verify: a damaged header, or a file from another
    cipher directory."""


class BackingSizeError(ContentError):
    """The backing file's size cannot be the encoding of any plaintext size."""


class TrailerError(ContentError):
    """The final page's 16 zero bytes did not decrypt to zero: the final page
    was damaged, truncated, or moved."""


class PageTagError(ContentError):
    """Authenticated mode: a page's tag does not match its stored bytes, its
    place or the file's size (``kind`` says how; fsck reports it)."""

    def __init__(self, message: str, kind: str = "page-tag") -> None:
        super().__init__(message)
        self.kind = kind


# --- names ------------------------------------------------------------------


class FileNameError(CryptfsError):
    """Base for errors about file, symlink-target and xattr names."""


class NameDecodeError(FileNameError):
    """A backing name is not a valid encrypted name for this directory."""


class DirIvMissingError(NameDecodeError):
    """A backing directory has no ``cryptfs.diriv`` (in a ``convergent-dirivs``
    directory it may be derived again: docs/format.md §5.1)."""


class NameTooLongError(FileNameError):
    """A plaintext name is longer than 255 bytes (ENAMETOOLONG)."""


class InvalidNameError(FileNameError):
    """A plaintext name is empty, '.', '..', or contains '/' or NUL."""


# --- the filesystem layer -----------------------------------------------------


class StaleInodeError(CryptfsError):
    """The kernel named an inode we no longer know, or its backing entry is
    gone or was replaced behind the mount's back (ENOENT)."""


class StaleHandleError(CryptfsError):
    """A file or directory handle that is not open (EBADF)."""


class XattrTooBigError(CryptfsError):
    """An extended attribute value too large to store encrypted (E2BIG)."""


# --- passwords and recovery codes -----------------------------------


class PasswordSourceError(CryptfsError):
    """No password: the file or extpass command failed, no terminal, or a
    mistyped confirmation."""

    exit_code = ExitCode.USAGE


class RecoveryCodeError(CryptfsError):
    """A recovery code that is mistyped or not a recovery code."""

    exit_code = ExitCode.PASSWORD


# --- mounting and unmounting ----------------------------------------


class MountError(CryptfsError):
    """The mount itself failed."""

    exit_code = ExitCode.MOUNT


class AlreadyMountedError(CryptfsError):
    """The cipher directory is mounted already (its lock is held)."""

    exit_code = ExitCode.MOUNTED


class MountPointError(CryptfsError):
    """The mount point cannot be used (mounted, dead, not a directory, not empty),
    or is not a cryptfs mount to unmount."""

    exit_code = ExitCode.USAGE


class BusyError(CryptfsError):
    """Unmount refused: a process uses the mounted filesystem."""

    exit_code = ExitCode.BUSY


# --- the command line and fsck --------------------------------------


class UsageError(CryptfsError):
    """A bad command line."""

    exit_code = ExitCode.USAGE


class OptionError(CryptfsError):
    """A bad or unknown ``-o`` mount option."""

    exit_code = ExitCode.USAGE


class ProblemsFound(CryptfsError):
    """fsck found damage."""

    exit_code = ExitCode.FSCK_PROBLEMS
