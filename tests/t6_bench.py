"""The benchmark script runs end to end (a smoke run; it asserts no speeds),
and its generated git repository is what the git rows expect."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_bench():
    """scripts/bench as a module (it has no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("bench", str(REPO / "scripts" / "bench"))
    spec = importlib.util.spec_from_loader("bench", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark mounts a tmpfs and drops caches")
def test_bench_quick_smoke(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench"), "--quick",
         "--systems", "raw", "pyfuse3-floor", "cryptfs-openssl", "cryptfs-openssl-authenticated",
         "--out", str(out), "--pin", "different", "--git-files", "300", "--git-commits", "20"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["systems"]) == {"raw", "pyfuse3-floor", "cryptfs-openssl",
                                       "cryptfs-openssl-authenticated"}
    mine = results["systems"]["cryptfs-openssl"]
    workloads = [label for label in mine if label != "daemon"]
    assert len(workloads) == 14
    assert [label for label in workloads if label.startswith("git")] == [
        "git clone 300 files", "git status, cold", "git status, warm", "git grep",
        "git checkout old"]
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
    assert results["pin"] == "different"
    if len(os.sched_getaffinity(0)) >= 2:  # pinned apart: never sampled on one CPU
        placement = results["placement"]["cryptfs-openssl"].values()
        assert sum(counts["different"] for counts in placement) > 0
        assert all(counts["same"] == counts["both"] == 0 for counts in placement)
    assert not any("cryptfs-bench-" in line for line in Path("/proc/mounts").read_text()
                   .splitlines())  # its tmpfs and mounts are gone


def test_the_generated_git_repository(tmp_path):
    """The same history every time, with the files, commits, old tag and
    grep hits the git rows rely on."""
    bench = load_bench()
    assert bench.fast_import_stream(200, 12) == bench.fast_import_stream(200, 12)
    repo = bench.make_repo(tmp_path / "repo", 200, 12)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                              text=True, env={**os.environ, **bench.GIT_ENV}).stdout

    assert len(git("ls-files").split()) == 200  # HEAD, checked out
    assert git("status", "--porcelain") == ""
    assert int(git("rev-list", "--count", "HEAD")) == 12
    old = git("ls-tree", "-r", "--name-only", bench.OLD_COMMIT).split()
    assert 160 <= len(old) < 200  # files were added since, and some changed
    assert git("diff", "--name-only", bench.OLD_COMMIT, "HEAD", "--diff-filter=M").split()
    assert git("grep", "-l", bench.GREP_WORD).split()
    assert max(path.count("/") for path in old) >= 2  # nested directories
    again = bench.make_repo(tmp_path / "again", 200, 12)
    assert git("rev-parse", "HEAD") == subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=again, check=True, capture_output=True,
        text=True).stdout  # deterministic to the commit ID
