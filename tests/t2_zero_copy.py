"""The AF_ALG engine really takes its zero-copy paths (checked with strace)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import afalg_engine

PAGES = 40
REPO = Path(__file__).resolve().parent.parent


def phase(lines: list[str], start: str, end: str) -> list[str]:
    begin = next(i for i, line in enumerate(lines) if f"MARK {start}" in line)
    stop = next(i for i, line in enumerate(lines) if f"MARK {end}" in line)
    return lines[begin + 1:stop]


@pytest.mark.afalg
def test_syscalls_of_zero_copy_paths(tmp_path):
    engine = afalg_engine()
    assert engine.zero_copy, "vmsplice should be allowed in the test VM"
    strace = shutil.which("strace")
    assert strace, "strace is installed by scripts/test"
    log = tmp_path / "strace.log"
    subprocess.run(
        [strace, "-o", str(log), "-e", "trace=read,pread64,readv,preadv,splice,vmsplice,"
         "sendmsg,recvfrom,write", sys.executable, str(REPO / "tests/helpers/zero_copy_probe.py"),
         str(tmp_path / "backing"), str(PAGES)],
        check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = log.read_text().splitlines()

    encrypt = phase(lines, "encrypt", "encrypted")
    vmsplices = [line for line in encrypt if line.startswith("vmsplice(")]
    sendmsgs = [line for line in encrypt if line.startswith("sendmsg(")]
    units = PAGES + 1
    assert len(vmsplices) == -(-units // 16)  # at most 16 pages per vmsplice
    assert len(sendmsgs) == units  # one request per data unit
    assert all("msg_iovlen=0" in line for line in sendmsgs)  # no data copied in

    marker = next(line for line in lines if "MARK decrypt fd=" in line)
    fd = re.search(r"fd=(\d+)", marker).group(1)
    decrypt = phase(lines, "decrypt fd=", "decrypted")
    file_splices = [line for line in decrypt if line.startswith(f"splice({fd},")]
    moved = sum(int(line.rsplit("= ", 1)[1]) for line in file_splices)
    assert moved == PAGES * 4096 + 100  # all ciphertext went file -> pipe -> cipher
    reads = [line for line in decrypt
             if re.match(rf"(read|pread64|readv|preadv)\({fd},", line)]
    # The only reads of the backing file are the 16-byte probes of the hole rule.
    assert all(int(line.rsplit("= ", 1)[1]) <= 16 for line in reads), reads
    assert len(reads) <= units
