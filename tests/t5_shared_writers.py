"""Two ``--shared`` mounts writing one file at once, each on its own half of
every page (tests/helpers/two_writers.py): both halves of every page survive,
seen through either mount and by fsck, in both modes.  On the host the two
mounts share one cipher directory; t5_nfs.py does the same across two NFS
clients in the kernel VM."""

from __future__ import annotations

import pytest

from tests.conftest import MOUNT_ENGINES, Mount, fsck_problems, init_cipherdir, require_fuse
from tests.helpers.mount_writers import lost_halves, write_halves

pytestmark = pytest.mark.fuse

ENGINE = MOUNT_ENGINES[0]
PAGES, ROUNDS = 32, 3


@pytest.mark.parametrize("mode", [(), ("--authenticated",)], ids=["default", "authenticated"])
def test_two_shared_mounts_never_lose_each_others_half_pages(tmp_path, mode):
    require_fuse()
    passfile = tmp_path / "password"
    init_cipherdir(tmp_path / "cipher", passfile, *mode)
    mounts = [Mount(tmp_path / "cipher", tmp_path / f"plain{i}", passfile, ENGINE,
                    extra=("--shared",)) for i in (1, 2)]
    try:
        for mount in mounts:
            mount.start()
        one, two = (mount.mountpoint / "shared.bin" for mount in mounts)
        size = write_halves(one, two, PAGES, ROUNDS)
        assert lost_halves(one, PAGES, size, ROUNDS) == []
        assert lost_halves(two, PAGES, size, ROUNDS) == []
    finally:
        for mount in mounts:
            mount.stop()
    for mount in mounts:
        mount.check_log()
    assert fsck_problems(mounts[0]) == []
