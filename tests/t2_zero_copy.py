"""The AF_ALG engine's syscalls (checked with strace): zero copy when
encrypting a buffer, one read and a sendmsg per unit when decrypting a
backing file."""

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
        [strace, "-o", str(log), "-e", "trace=read,pread64,readv,preadv,preadv2,splice,vmsplice,"
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
    assert not [line for line in decrypt if line.startswith(f"splice({fd},")]
    reads = [line for line in decrypt
             if re.match(rf"(read|pread64|readv|preadv2?)\({fd},", line)]
    # The whole run in one read (preadv), hole rule included, then each data
    # unit copied in with its request.
    assert sum(int(line.rsplit("= ", 1)[1]) for line in reads) == PAGES * 4096 + 100, reads
    assert len(reads) == 1, reads
    requests = [line for line in decrypt if line.startswith("sendmsg(")]
    assert len(requests) == units and all("msg_iovlen=1" in line for line in requests)
