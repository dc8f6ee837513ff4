"""Run under strace by t2_zero_copy: encrypt an aligned buffer and decrypt a
backing file with the AF_ALG engine, printing markers between the phases."""

from __future__ import annotations

import os
import secrets
import sys

from cryptfs.engines.afalg import AfalgEngine
from cryptfs.engines.base import PAGE_SIZE, aligned_buffer

PAGES = int(sys.argv[2])


def mark(text: str) -> None:
    os.write(1, f"MARK {text}\n".encode())


def main() -> None:
    path = sys.argv[1]
    # One thread (no split of the run): strace follows this thread only, and
    # the counts below are those of one serial run.
    engine = AfalgEngine(AfalgEngine.probe().zero_copy, helpers=0)
    session = engine.open_session(secrets.token_bytes(64))
    length = PAGES * PAGE_SIZE + 100  # full pages, then a final unit with trailer
    plain = aligned_buffer(length)
    plain[:] = secrets.token_bytes(length)
    cipher = bytearray(length)
    mark("encrypt")
    session.encrypt(0, plain, memoryview(cipher))
    mark("encrypted")
    with open(path, "wb") as f:
        f.write(cipher)
    fd = os.open(path, os.O_RDONLY)
    out = bytearray(length)
    mark(f"decrypt fd={fd}")
    session.decrypt_file(0, fd, 0, length, memoryview(out))
    mark("decrypted")
    if out != plain[:]:
        sys.exit("round trip failed")


if __name__ == "__main__":
    main()
