"""The view's extended attributes: each user.* attribute of a plaintext
file or directory sealed as a forward mount stores it, with the value's
nonce derived (``ReverseDerivation.xattr_nonce``) instead of drawn, so
every mount shows the same bytes.  Attributes in other namespaces are
not carried (a forward mount keeps only user.* ones)."""

from __future__ import annotations

import logging

from cryptfs.errors import InvalidNameError, NameTooLongError, XattrTooBigError
from cryptfs.keys.reverse import ReverseDerivation
from cryptfs.names.metadata import MetadataCipher, XattrOwner

log = logging.getLogger(__name__)


class ViewXattrs:
    def __init__(self, metadata: MetadataCipher, derivation: ReverseDerivation) -> None:
        self._metadata = metadata
        self._derivation = derivation

    def seal(self, owner: XattrOwner | None, plain: dict[bytes, bytes],
             where: str) -> dict[bytes, bytes]:
        """Stored name -> stored value of every attribute in ``plain``; one
        a forward mount could not hold either is left out, with a warning
        naming ``where``."""
        if not self._metadata.bound:
            owner = None
        owner_id = b"" if owner is None else owner.kind + owner.identity
        out = {}
        for name, value in plain.items():
            try:
                stored = self._metadata.encrypt_xattr_name(name, owner)
                nonce = self._derivation.xattr_nonce(owner_id, stored, value)
                out[stored] = self._metadata.encrypt_xattr_value(stored, value, owner, nonce)
            except (InvalidNameError, NameTooLongError, XattrTooBigError) as exc:
                log.warning("%s: attribute %r left out of the view: %s", where, name, exc)
        return out
