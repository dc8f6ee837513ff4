"""The view's entry names: each plaintext name encrypted with its
directory's IV exactly as a forward mount stores it, a long name as its
hashed entry plus the sidecar that holds the full encrypted name."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptfs.errors import NameDecodeError
from cryptfs.names.filenames import (
    LONG_NAME_MIN,
    NAME_MAX,
    RESERVED_PREFIX,
    SIDECAR_SUFFIX,
    NameCipher,
    is_longname,
)


@dataclass(frozen=True, slots=True)
class ViewName:
    """One entry of a view directory standing for plaintext name ``plain``."""

    name: str
    plain: bytes
    sidecar: bool  # the long name's sidecar, not the entry itself


def view_names(cipher: NameCipher, dir_iv: bytes, plain: bytes) -> list[ViewName]:
    """The entry a plaintext name becomes, and its sidecar if the name is long."""
    entry = cipher.to_backing(dir_iv, plain)
    out = [ViewName(entry.name, plain, False)]
    if entry.sidecar_name is not None:
        out.append(ViewName(entry.sidecar_name, plain, True))
    return out


def sidecar_bytes(cipher: NameCipher, dir_iv: bytes, plain: bytes) -> bytes:
    """What a forward mount writes into a long name's sidecar."""
    entry = cipher.to_backing(dir_iv, plain)
    assert entry.sidecar is not None
    return entry.sidecar.encode("ascii")


def resolve(cipher: NameCipher, dir_iv: bytes, name: str,
            plain_names: Callable[[], Iterable[bytes]]) -> ViewName | None:
    """The plaintext name a view entry stands for, or None.  A short name
    is decrypted; a long one (or its sidecar) is a hash, so the
    directory's long plaintext names are encrypted until one matches."""
    if len(name) > NAME_MAX:
        return None
    if name.startswith(RESERVED_PREFIX):
        sidecar = name.endswith(SIDECAR_SUFFIX)
        longname = name[:-len(SIDECAR_SUFFIX)] if sidecar else name
        if not is_longname(longname):
            return None
        for plain in plain_names():
            if len(plain) >= LONG_NAME_MIN and cipher.to_backing(dir_iv, plain).name == longname:
                return ViewName(name, plain, sidecar)
        return None
    try:
        plain = cipher.decode(dir_iv, name)
    except NameDecodeError:
        return None
    if cipher.to_backing(dir_iv, plain).name != name:  # a long name's full form
        return None
    return ViewName(name, plain, False)
