"""Model-based test: random operation sequences run against the mount and a
plain reference directory side by side; both must agree after every step
(results, errors, contents, sizes, link counts), also across remounts."""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

P = 4096
# Few paths, so that operations often meet the files earlier ones created.
PATHS = ["f1", "f2", "d1", "d1/f1", "d1/d2", "d1/d2/f1", "n" * 200, "d1/" + "m" * 255]
paths = st.sampled_from(PATHS)
offsets = st.one_of(st.integers(0, 3 * P), st.sampled_from([P - 1, P, P + 1, 2 * P - 16]))
lengths = st.one_of(st.integers(1, 2 * P), st.sampled_from([1, 15, 16, 17, P, P + 1]))
EXAMPLES = int(os.environ.get("CRYPTFS_MODEL_EXAMPLES", "25"))


def snapshot(root: Path) -> dict[str, tuple]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISDIR(st_.st_mode):
                state[rel] = ("dir",)
            else:
                state[rel] = ("file", st_.st_size, st_.st_nlink, path.read_bytes())
    return state


def outcome(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return None


class FilesystemModel(RuleBasedStateMachine):
    mount = None  # set by the test: the module's Mount
    scratch: Path = Path()

    def __init__(self) -> None:
        super().__init__()
        run = uuid.uuid4().hex[:8]
        self.fs = self.mount.mountpoint / f"model-{run}"
        self.ref = self.scratch / f"model-{run}"
        self.fs.mkdir()
        self.ref.mkdir()

    def both(self, fn, *rel_paths, extra=()):
        results = [outcome(fn, *(root / p for p in rel_paths), *extra)
                   for root in (self.fs, self.ref)]
        assert results[0] == results[1], f"{fn.__name__}{rel_paths}: mount {results[0]}, " \
                                         f"reference {results[1]}"

    @rule(path=paths, offset=offsets, length=lengths, byte=st.integers(1, 255))
    def write(self, path, offset, length, byte):
        def do(p, offset, data):
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(do, path, extra=(offset, bytes([byte]) * length))

    @rule(path=paths, size=offsets)
    def truncate(self, path, size):
        self.both(os.truncate, path, extra=(size,))

    @rule(src=paths, dst=paths)
    def rename(self, src, dst):
        self.both(os.rename, src, dst)

    @rule(src=paths, dst=paths)
    def link(self, src, dst):
        self.both(os.link, src, dst)

    @rule(path=paths)
    def unlink(self, path):
        self.both(os.unlink, path)

    @rule(path=paths)
    def mkdir(self, path):
        self.both(os.mkdir, path)

    @rule(path=paths)
    def rmdir(self, path):
        self.both(os.rmdir, path)

    @rule()
    def remount(self):
        self.mount.restart()

    @invariant()
    def same_tree(self):
        assert snapshot(self.fs) == snapshot(self.ref)

    def teardown(self):
        self.mount.restart()
        assert snapshot(self.fs) == snapshot(self.ref)
        shutil.rmtree(self.fs)
        shutil.rmtree(self.ref)


def run_model(mount, tmp_path) -> None:
    FilesystemModel.mount = mount
    FilesystemModel.scratch = tmp_path
    run_state_machine_as_test(FilesystemModel, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
        suppress_health_check=list(HealthCheck)))


def test_random_operations_match_a_plain_directory(cryptfs_mount, tmp_path):
    run_model(cryptfs_mount, tmp_path)


def test_authenticated_mode_matches_a_plain_directory(authenticated_mount, tmp_path):
    run_model(authenticated_mount, tmp_path)
