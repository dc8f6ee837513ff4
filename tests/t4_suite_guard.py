"""The suite itself: on CI a machine where FUSE is unusable must fail, not
skip every mount test and stay green."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MOUNTING_TEST = '''
import pytest

@pytest.mark.fuse
def test_mounts():
    pass
'''


def run_without_fuse(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """pytest on one ``fuse``-marked test, with /dev/fuse covered by a
    ``nodev`` bind of /dev/null in a private mount namespace: opening it
    fails, even as root."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to hide /dev/fuse")
    (tmp_path / "t9_probe.py").write_text(MOUNTING_TEST)
    conftest = Path(__file__).with_name("conftest.py")
    (tmp_path / "conftest.py").write_text(conftest.read_text())
    repo = Path(__file__).parent.parent
    script = ("mount --bind /dev/null /dev/fuse && mount -o remount,bind,nodev /dev/fuse && "
              f"exec {sys.executable} -m pytest "
              f"-p no:cacheprovider -q -c {repo / 'pyproject.toml'} --rootdir {tmp_path} "
              f"{tmp_path / 't9_probe.py'}")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("CI", "CRYPTFS_REQUIRE_FUSE", "CRYPTFS_REQUIRE_AFALG")}
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          cwd=repo, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_without_fuse_a_mount_test_is_skipped_off_ci(tmp_path):
    proc = run_without_fuse(tmp_path, {})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 skipped" in proc.stdout, proc.stdout


def test_without_fuse_a_mount_test_fails_on_ci(tmp_path):
    proc = run_without_fuse(tmp_path, {"CI": "true"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FUSE is required here" in proc.stdout, proc.stdout
