"""The content codec against a model (a bytearray): shared by the plain and
the authenticated mode's tests."""

from __future__ import annotations

import os
import secrets

from hypothesis import HealthCheck, settings

from cryptfs.engines.base import PAGE_SIZE


def dense_copy_reads(codec, backing: int, tmp_path, length: int) -> bytes:
    """What a copy of the backing file with its holes written out as zeros
    reads as (also used by the authenticated mode's tests)."""
    copy = tmp_path / "dense"
    copy.write_bytes(os.pread(backing, os.fstat(backing).st_size, 0))
    fd = os.open(copy, os.O_RDONLY)
    try:
        return codec.open(fd).read(0, length)
    finally:
        os.close(fd)


MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("CRYPTFS_HYPOTHESIS_EXAMPLES", "150")), deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture])


def check_against_model(codec, tmp_path, ops, seed) -> None:
    """Apply ``ops`` to a file through ``codec`` and to a bytearray; they
    must agree after every step and after reopening (also used by the
    authenticated mode's tests)."""
    path = tmp_path / f"model-{secrets.token_hex(4)}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        f, model = codec.open(fd), bytearray()
        for i, (op, offset, length) in enumerate(ops):
            if op == "write":
                data = bytes([(seed + i) % 255 + 1]) * length
                f.write(offset, data)
                model.extend(bytes(max(0, offset - len(model))))
                model[offset:offset + length] = data
            else:
                f.truncate(offset)
                del model[offset:]
                model.extend(bytes(offset - len(model)))
            assert f.size() == len(model)
        assert codec.open(fd).read(0, len(model) + PAGE_SIZE) == bytes(model)
    finally:
        os.close(fd)
        path.unlink()
