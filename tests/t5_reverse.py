"""Reverse mode end to end: a real reverse mount of a plaintext tree,
copied by rsync, mounted forward, compared with the tree (issue 20).

Every test mounts for real; the kernel engine runs one small round trip
(``afalg``, in the kernel VM)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from cryptfs.keys.reverse import REVERSE_KEYFILE_NAME
from tests.conftest import (
    MOUNT_TIMEOUT,
    PASSWORD,
    Mount,
    cryptfs_cmd,
    require_fuse,
    usable_engine,
)
from tests.helpers.cli import FAST_KDF, cryptfs

AFALG = pytest.mark.afalg
MARKER = "PLAINTEXT-MARKER"  # in a name, contents, a link target, an xattr


# -- the plaintext trees ------------------------------------------------------------


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sized(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that differ per page (so a misplaced page shows)."""
    block = hashlib.sha256(seed.to_bytes(4, "little")).digest()
    return (block * (n // 32 + 1))[:n] if n < 4096 else \
        b"".join(hashlib.sha256(bytes([seed, i % 256, i // 256])).digest() * 128
                 for i in range(n // 4096 + 1))[:n]


def small_tree(root: Path) -> None:
    """A bit of every kind of entry."""
    write(root / "a.txt", b"hello\n")
    write(root / "sub" / "page.bin", sized(4097, 1))
    write(root / "empty", b"")
    os.symlink("a.txt", root / "link")
    os.mkfifo(root / "pipe.fifo")
    write(root / ("L" * 255), b"long name\n")
    os.setxattr(root / "a.txt", "user.note", b"value")
    os.setxattr(root / "sub", "user.dir", b"on a directory")
    write(root / MARKER, MARKER.encode() * 3)
    os.symlink(MARKER, root / "sub" / "marked-link")
    os.setxattr(root / "sub" / "page.bin", f"user.{MARKER}", MARKER.encode())


def full_tree(root: Path) -> None:
    """Names of every length, a deep tree, holes, hard links, symlinks,
    xattrs, fifos, empty files, sizes around page and tag-page edges."""
    small_tree(root)
    names = root / "names"
    for length in range(1, 256):
        write(names / ("n" * length), sized(length, length))
    write(names / ("é" * 127), b"two-byte characters\n")  # 254 bytes
    deep = root
    for depth in range(40):
        deep = deep / f"d{depth}"
    write(deep / "bottom", b"deep\n")
    sizes = [1, 15, 16, 4079, 4080, 4081, 4095, 4096, 4097, 8192,
             252 * 4096, 252 * 4096 + 1, 508 * 4096 - 5, 700 * 4096 + 17]
    for n in sizes:
        write(root / "sizes" / f"s{n}", sized(n, n % 251))
    sparse = root / "holes" / "sparse"
    sparse.parent.mkdir()
    with open(sparse, "wb") as f:
        f.seek(3 * 1024 * 1024 + 5)
        f.write(b"after a hole")
        f.seek(9 * 1024 * 1024)
        f.write(b"x")
    write(root / "holes" / "only-hole", b"")
    os.truncate(root / "holes" / "only-hole", 2 * 1024 * 1024 + 3)
    write(root / "links" / "one", b"hard linked\n")
    os.link(root / "links" / "one", root / "links" / "two")
    os.link(root / "links" / "one", root / "sub" / "three")
    os.symlink("/an/absolute/target", root / "links" / "absolute")
    os.symlink("dangling", root / "links" / "dangling")
    os.symlink("t" * 3000, root / "links" / "long-target")
    os.symlink("x", root / "links" / ("s" * 250))
    os.mkfifo(root / "links" / "another.fifo")
    for i in range(3):
        os.setxattr(root / "sizes" / "s4096", f"user.k{i}", bytes([i]) * (i * 100))
    os.setxattr(root / "names", "user.empty", b"")


def signature(root: Path) -> dict[str, tuple]:
    """Relative path -> (type, mode, size, mtime, content digest or link
    target, user.* xattrs) of every entry but the reverse key file."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel == REVERSE_KEYFILE_NAME:
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
                continue
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = None
            xattrs = {n: os.getxattr(path, n) for n in sorted(os.listxattr(path))
                      if n.startswith("user.")} if not stat.S_ISFIFO(st.st_mode) else {}
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), size,
                        st.st_mtime_ns, content, xattrs)
    return out


def view_digest(root: Path, rels: list[str] | None = None) -> dict[str, str]:
    """Relative path -> digest of every entry of a view (or of ``rels``,
    reached by lookups alone, no listing): file bytes, link targets,
    stored xattrs (names and values), sizes and modes."""
    out = {}
    if rels is None:
        rels = [str(path.relative_to(root)) for path in sorted(root.rglob("*"))]
    for rel in rels:
        path = root / rel
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = "link:" + os.readlink(path)
            continue
        h = hashlib.sha256(f"{st.st_mode:o} {st.st_size}".encode())
        if stat.S_ISREG(st.st_mode):
            h.update(path.read_bytes())
        if not stat.S_ISFIFO(st.st_mode):
            for name in sorted(os.listxattr(path)):
                h.update(name.encode() + b"=" + os.getxattr(path, name))
        out[rel] = h.hexdigest()
    return out


def assert_ciphertext_only(root: Path) -> None:
    """No name, content, link target or xattr under ``root`` shows MARKER."""
    marker = MARKER.encode()
    for path in root.rglob("*"):
        assert MARKER not in path.name
        if path.is_symlink():
            assert MARKER not in os.readlink(path)
        elif path.is_file() or path.is_dir():
            if path.is_file():
                assert marker not in path.read_bytes(), path
            for name in os.listxattr(path):
                assert MARKER not in name and marker not in os.getxattr(path, name)


# -- mounting ---------------------------------------------------------------------


class ReverseMount(Mount):
    """``cryptfs mount --reverse PLAINDIR MNT`` in the foreground; ``prefix``:
    a command that runs the daemon (setpriv, to drop capabilities)."""

    def __init__(self, plaindir: Path, mountpoint: Path, passfile: Path, engine: str = "openssl",
                 extra: tuple[str, ...] = (), prefix: tuple[str, ...] = ()) -> None:
        super().__init__(plaindir, mountpoint, passfile, engine, ("--reverse", *extra))
        self.prefix = prefix

    def start(self) -> ReverseMount:
        if not self.prefix:
            super().start()
            return self
        import time
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, *cryptfs_cmd("mount", str(self.cipherdir), str(self.mountpoint),
                                            "--passfile", str(self.passfile), "--foreground",
                                            "--engine", self.engine, *self.extra)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the reverse mount did not come up:\n{self.log()}")
            time.sleep(0.05)
        return self

    def __enter__(self) -> Path:
        return self.start().mountpoint

    def __exit__(self, *exc_info) -> None:
        self.stop()


def init_reverse(plain: Path, passfile: Path, *extra: str) -> None:
    passfile.write_text(PASSWORD + "\n")
    passfile.chmod(0o600)
    cryptfs("init", "--reverse", str(plain), "--passfile", str(passfile), "--no-recovery-code",
            *FAST_KDF, *extra)


def rsync(src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess:
    # --modify-window=-1: rsync's default compares times to the second and
    # leaves a new directory or fifo with the time it was made whenever the
    # source's time is in the same second (the tree was built just before).
    proc = subprocess.run(["rsync", "-aX", "--modify-window=-1", *extra, f"{src}/", f"{dst}/"],
                          capture_output=True,
                          text=True, timeout=MOUNT_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return proc


def transferred(stats: str) -> int:
    return int(re.search(r"Number of regular files transferred: ([\d,]+)", stats)
               .group(1).replace(",", ""))


@pytest.fixture
def tree(tmp_path) -> tuple[Path, Path]:
    """A full plaintext tree with a reverse configuration, and its password file."""
    require_fuse()
    plain, passfile = tmp_path / "plain", tmp_path / "password"
    plain.mkdir()
    full_tree(plain)
    init_reverse(plain, passfile)
    return plain, passfile


# -- the round trip ------------------------------------------------------------------


@pytest.mark.parametrize(("engine", "init_extra", "builder"), [
    pytest.param("openssl", (), full_tree, id="openssl"),
    pytest.param("openssl", ("--authenticated",), full_tree, id="openssl-authenticated"),
    pytest.param("afalg", ("--authenticated",), small_tree, id="afalg-authenticated",
                 marks=AFALG),
])
def test_backup_of_the_view_mounts_forward_as_the_tree(tmp_path, engine, init_extra, builder):
    """rsync the view to a backup directory, mount the backup forward with
    the same password: the same tree (contents, types, modes, sizes,
    times, xattrs, symlinks, fifos; hard links as separate equal files),
    and fsck finds the backup sound."""
    require_fuse()
    engine = usable_engine(engine)
    plain, passfile = tmp_path / "plain", tmp_path / "password"
    plain.mkdir()
    builder(plain)
    init_reverse(plain, passfile, *init_extra)
    backup = tmp_path / "backup"
    with ReverseMount(plain, tmp_path / "view", passfile, engine) as view:
        assert (view / "cryptfs.conf").read_bytes() == (plain / REVERSE_KEYFILE_NAME).read_bytes()
        rsync(view, backup)
    assert not (backup / REVERSE_KEYFILE_NAME).exists()
    assert_ciphertext_only(backup)
    forward = Mount(backup, tmp_path / "forward", passfile, engine).start()
    try:
        diff = subprocess.run(["diff", "-r", "--no-dereference", "-x", REVERSE_KEYFILE_NAME,
                               "-x", "*.fifo", str(plain), str(forward.mountpoint)],
                              capture_output=True, text=True)
        assert diff.returncode == 0, diff.stdout[-3000:]
        assert signature(forward.mountpoint) == signature(plain)
    finally:
        forward.stop()
    forward.check_log()
    fsck = cryptfs("fsck", str(backup), "--passfile", str(passfile), "--json", check=False)
    assert fsck.returncode == 0, fsck.stdout[-3000:]


def test_two_mounts_show_the_same_bytes(tree, tmp_path):
    """Two reverse mounts (two daemons) of one tree: every entry, byte,
    link target and stored xattr equal.  The second mount is never listed:
    every entry is found by lookup of its name alone (long names too)."""
    plain, passfile = tree
    with ReverseMount(plain, tmp_path / "one", passfile) as one, \
            ReverseMount(plain, tmp_path / "two", passfile) as two:
        first = view_digest(one)
        second = view_digest(two, list(first))
    assert len(first) > 300
    assert first == second


def test_after_one_change_rsync_sends_that_file_alone(tree, tmp_path):
    """A second rsync (--checksum: contents compared, not times) after one
    file changed transfers that file only: the rest of the view is the
    same bytes on a new mount."""
    plain, passfile = tree
    backup = tmp_path / "backup"
    with ReverseMount(plain, tmp_path / "view", passfile) as view:
        rsync(view, backup)
    data = bytearray((plain / "sizes" / "s8192").read_bytes())
    data[5000] ^= 1
    (plain / "sizes" / "s8192").write_bytes(data)
    with ReverseMount(plain, tmp_path / "view", passfile) as view:
        stats = rsync(view, backup, "--checksum", "--stats").stdout
        again = rsync(view, backup, "--checksum", "--stats").stdout
    assert transferred(stats) == 1, stats
    assert transferred(again) == 0, again


def test_excluded_entries_never_appear(tree, tmp_path):
    """--exclude and --exclude-from (gitignore syntax, a negation
    included): absent from listings and from the backup, ENOENT when
    looked up by their encrypted name (taken from a view without
    exclusions)."""
    plain, passfile = tree
    write(plain / "build" / "out.o", b"object")
    write(plain / "notes.log", b"log")
    write(plain / "sub" / "keep.log", b"kept")
    write(plain / "secret", b"top secret")
    patterns = tmp_path / "exclude"
    patterns.write_text("# comment\n/secret\n!keep.log\n")
    extra = ("--exclude", "*.log", "--exclude", "build/", "--exclude-from", str(patterns))
    with ReverseMount(plain, tmp_path / "all", passfile) as everything, \
            ReverseMount(plain, tmp_path / "some", passfile, extra=extra) as some:
        full, part = set(view_digest(everything)), set(view_digest(some))
        gone = full - part
        assert len(gone) == 5  # build, its IV file and out.o, notes.log, secret
        for rel in gone:
            with pytest.raises(FileNotFoundError):
                os.lstat(some / rel)
        backup = tmp_path / "backup"
        rsync(some, backup)
    forward = Mount(backup, tmp_path / "forward", passfile, "openssl").start()
    try:
        shown = {str(p.relative_to(forward.mountpoint)) for p in forward.mountpoint.rglob("*")}
    finally:
        forward.stop()
    assert {"build", "build/out.o", "notes.log", "secret"} & shown == set()
    assert "sub/keep.log" in shown and "a.txt" in shown


def test_fstab_form_with_exclude_from(tree, tmp_path):
    """``cryptfs PLAINDIR MNT -o reverse,exclude_from=FILE,...`` (what
    mount(8) runs for an fstab line) mounts the view with the exclusions."""
    plain, passfile = tree
    patterns = tmp_path / "exclude"
    patterns.write_text("names/\n")
    mountpoint = tmp_path / "view"
    mountpoint.mkdir()
    opts = f"reverse,exclude_from={patterns},passfile={passfile}"
    cryptfs(str(plain), str(mountpoint), "-o", opts)
    try:
        shown = os.listdir(mountpoint)
        assert "cryptfs.conf" in shown and len(shown) >= 8
        with ReverseMount(plain, tmp_path / "all", passfile) as everything:
            assert len(os.listdir(everything)) == len(shown) + 1
    finally:
        cryptfs("unmount", str(mountpoint))


def test_every_write_is_erofs(tree, tmp_path):
    plain, passfile = tree
    before = signature(plain)
    with ReverseMount(plain, tmp_path / "view", passfile) as view:
        files = [p for p in view.iterdir() if p.is_file() and not p.is_symlink()]
        dirs = [p for p in view.iterdir() if p.is_dir() and not p.is_symlink()]
        file, directory = files[0], dirs[0]
        attempts = {
            "create": lambda: os.open(view / "new", os.O_WRONLY | os.O_CREAT),
            "open for writing": lambda: os.open(file, os.O_RDWR),
            "truncate": lambda: os.truncate(file, 0),
            "mkdir": lambda: os.mkdir(view / "d"),
            "mknod": lambda: os.mkfifo(view / "f"),
            "symlink": lambda: os.symlink("x", view / "s"),
            "link": lambda: os.link(file, view / "h"),
            "unlink": lambda: os.unlink(file),
            "rmdir": lambda: os.rmdir(directory),
            "rename": lambda: os.rename(file, view / "r"),
            "chmod": lambda: os.chmod(file, 0o600),
            "chown": lambda: os.chown(file, 1, 1),
            "utime": lambda: os.utime(file, (0, 0)),
            "setxattr": lambda: os.setxattr(file, "user.x", b"1"),
            "removexattr": lambda: os.removexattr(directory, "user.x"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS, what
        assert not os.access(file, os.W_OK)
    assert signature(plain) == before


def test_an_unreadable_file_fails_alone(tree, tmp_path):
    """A file the daemon may not read (mode 000, the daemon without root's
    capability to override it): EACCES for that file, its name and size
    still listed; every other file reads, and rsync copies the rest."""
    plain, passfile = tree
    (plain / "sub" / "page.bin").chmod(0)
    drop = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    with ReverseMount(plain, tmp_path / "view", passfile, prefix=drop) as view:
        digest_failures = []
        for path in sorted(view.rglob("*")):
            if path.is_file() and not path.is_symlink():
                try:
                    path.read_bytes()
                except PermissionError:
                    digest_failures.append(path)
        assert len(digest_failures) == 1
        assert digest_failures[0].stat().st_size == 4096 + 4097 + 16
        proc = subprocess.run(["rsync", "-aX", f"{view}/", f"{tmp_path / 'backup'}/"],
                              capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
        assert proc.returncode == 23, proc.stderr  # "partial transfer due to error"
        assert proc.stderr.count("Permission denied") == 1, proc.stderr
        assert os.path.ismount(view)
        assert len(list(view.rglob("*"))) > 300  # and it still lists everything


def test_key_file_elsewhere_and_hidden_inside(tmp_path):
    """--config outside PLAINDIR: the view shows it as cryptfs.conf; a
    --config file inside PLAINDIR under any name is never shown; the mount
    point may not lie inside PLAINDIR."""
    require_fuse()
    plain, passfile = tmp_path / "plain", tmp_path / "password"
    plain.mkdir()
    small_tree(plain)
    outside, inside = tmp_path / "reverse.conf", plain / "my-key"
    for config in (outside, inside):
        init_reverse(plain, passfile, "--config", str(config))
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        with ReverseMount(plain, tmp_path / "view", passfile,
                          extra=("--config", str(config))) as view:
            assert (view / "cryptfs.conf").read_bytes() == config.read_bytes()
            sizes = sorted(p.lstat().st_size for p in view.iterdir())
            assert config.stat().st_size in sizes  # as cryptfs.conf only
            assert len(list(view.iterdir())) == 2 + 8  # conf, diriv, 7 entries + sidecar
    assert not (plain / REVERSE_KEYFILE_NAME).exists()
    inner = plain / "sub" / "mnt"
    inner.mkdir()
    proc = cryptfs("mount", "--reverse", "--config", str(outside), str(plain), str(inner),
                   "--passfile", str(passfile), check=False)
    assert proc.returncode != 0 and "inside" in proc.stderr


def test_a_file_changing_while_open_reads_as_when_opened(tree, tmp_path):
    """A file grown after its size was seen and before it was opened, then
    cut short while open: the open file's size and bytes are those of the
    file when it was opened (final page and trailer where that size puts
    them), and a later stat shows the new state."""
    plain, passfile = tree
    target = plain / "sizes" / "s4096"
    with ReverseMount(plain, tmp_path / "view", passfile) as view:
        (seen,) = [p for p in view.rglob("*") if not p.is_symlink() and p.is_file()
                   and p.lstat().st_size == 4096 + 4096 + 16]
        target.write_bytes(sized(10000, 7))  # the kernel still holds the old size
        with open(seen, "rb") as f:
            assert os.fstat(f.fileno()).st_size == 4096 + 10000 + 16
            head = f.read(4096)
            os.truncate(target, 100)
            rest = f.read()
        assert len(head + rest) == 4096 + 10000 + 16
        os.utime(target)
        with open(seen, "rb") as f:
            assert len(f.read()) == 4096 + 100 + 16


def test_changes_behind_the_view_show_within_seconds(tmp_path):
    """The plaintext tree is live data: the view's names and attributes are
    cached for a second, not for the forward mount's minute, so a backup run
    just after a change copies it.  A stat'ed file that grows, and a name
    looked up before it existed, are seen two seconds later."""
    import time
    require_fuse()
    plain, passfile = tmp_path / "plain", tmp_path / "password"
    plain.mkdir()
    write(plain / "grows", b"x" * 100)
    init_reverse(plain, passfile)
    with ReverseMount(plain, tmp_path / "view", passfile) as view:
        def backing(name: str) -> Path:
            out = cryptfs("path", "encrypt", str(plain), name, "--via-mount")
            return view / out.stdout.splitlines()[0]
        grows = backing("grows")
        before = grows.stat().st_size
        write(plain / "later", b"y")
        new = backing("later")
        (plain / "later").unlink()
        assert not new.exists()  # a negative entry, now cached
        write(plain / "later", b"y")
        write(plain / "grows", b"x" * 9000)
        time.sleep(2)
        assert grows.stat().st_size > before
        assert new.exists()
