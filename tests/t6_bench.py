"""The benchmark script runs end to end (a smoke run; it asserts no speeds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark mounts a tmpfs and drops caches")
def test_bench_quick_smoke(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench"), "--quick",
         "--systems", "raw", "pyfuse3-floor", "cryptfs-openssl", "cryptfs-openssl-authenticated",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["systems"]) == {"raw", "pyfuse3-floor", "cryptfs-openssl",
                                       "cryptfs-openssl-authenticated"}
    mine = results["systems"]["cryptfs-openssl"]
    workloads = [label for label in mine if label != "daemon"]
    assert len(workloads) == 8
    assert all(mine[label]["median"] > 0 for label in workloads)
    assert mine["daemon"]["peak_rss_mib"] > 0
    assert set(results["ratios"]["cryptfs-openssl vs raw"]) == set(workloads)
    assert set(results["ratios"]["cryptfs-openssl vs pyfuse3-floor"]) == set(workloads)
    floor = results["systems"]["pyfuse3-floor"]
    assert all(floor[label]["median"] > 0 for label in workloads)
    pair = "cryptfs-openssl-authenticated vs cryptfs-openssl"  # the mode's cost
    assert set(results["ratios"][pair]) == set(workloads)
    table = (out / "results.md").read_text()
    assert "| workload | raw | pyfuse3-floor | cryptfs-openssl | cryptfs-openssl-authenticated |" \
        in table
    assert (out / "ratios.png").stat().st_size > 0
    assert not any("cryptfs-bench-" in line for line in Path("/proc/mounts").read_text()
                   .splitlines())  # its tmpfs and mounts are gone
