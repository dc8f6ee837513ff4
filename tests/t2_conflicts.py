"""Sync-tool conflict copies of backing names (cryptfs/names/conflicts.py)."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cryptfs.keys.hierarchy import KeyRing
from cryptfs.names.conflicts import (
    ConflictCopy,
    Kind,
    Tool,
    backing_kind,
    candidates,
    display_name,
    parse,
)
from cryptfs.names.filenames import DIRIV_NAME, NAME_MAX, NameCipher, check_name
from tests.helpers.sync_tools import make_conflict

NAMES = NameCipher(KeyRing(bytes(range(32))))
IV = bytes(16)


def backing(plain: bytes, dir_iv: bytes = IV) -> tuple[bytes, bytes | None]:
    """The entry name and, for a long name, its sidecar's name."""
    entry = NAMES.to_backing(dir_iv, plain)
    return entry.name.encode(), (entry.sidecar_name.encode() if entry.sidecar else None)


E, _ = backing(b"report.txt")  # a short encoded name (43 characters)
LONG, SIDECAR = backing(b"L" * 200)
DIRIV = DIRIV_NAME.encode()
assert SIDECAR is not None

# --- every tool's pattern, as found in the wild --------------------------------------

REAL = [
    # (conflict copy's name, original, tool, date, time, device, counter)
    (E + b".sync-conflict-20261207-101500-ABCDEFG", E, Tool.SYNCTHING,
     "2026-12-07", "10:15:00", b"ABCDEFG", None),
    (b"cryptfs.longname.sync-conflict-20261207-101500-Q2RSTU7" + LONG[16:], LONG,
     Tool.SYNCTHING, "2026-12-07", "10:15:00", b"Q2RSTU7", None),
    (LONG + b".sync-conflict-20261207-101500-ABCDEFG.name", SIDECAR, Tool.SYNCTHING,
     "2026-12-07", "10:15:00", b"ABCDEFG", None),
    (b"cryptfs.sync-conflict-20261207-101500-ABCDEFG.diriv", DIRIV, Tool.SYNCTHING,
     "2026-12-07", "10:15:00", b"ABCDEFG", None),
    (E + b" (conflicted copy 2026-12-07 101500)", E, Tool.NEXTCLOUD,
     "2026-12-07", "10:15:00", None, None),
    (E + b" (conflicted copy alice 2026-12-07 101500)", E, Tool.NEXTCLOUD,
     "2026-12-07", "10:15:00", b"alice", None),
    (b"cryptfs (conflicted copy 2026-12-07 101500).diriv", DIRIV, Tool.NEXTCLOUD,
     "2026-12-07", "10:15:00", None, None),
    (LONG + b" (conflicted copy 2026-12-07 235959).name", SIDECAR, Tool.NEXTCLOUD,
     "2026-12-07", "23:59:59", None, None),
    (E + b" (case clash from 2026-12-07 101500)", E, Tool.NEXTCLOUD,
     "2026-12-07", "10:15:00", None, None),
    (E + b"_conflict-20261207-101500", E, Tool.OWNCLOUD_LEGACY,
     "2026-12-07", "10:15:00", None, None),
    (E + b"_conflict_bob-20261207-101500", E, Tool.OWNCLOUD_LEGACY,
     "2026-12-07", "10:15:00", b"bob", None),
    (b"cryptfs.longname_conflict-20261207-101500" + LONG[16:], LONG, Tool.OWNCLOUD_LEGACY,
     "2026-12-07", "10:15:00", None, None),
    (E + b" (Ken's conflicted copy 2026-12-07)", E, Tool.DROPBOX,
     "2026-12-07", None, b"Ken", None),
    (E + b" (Pierre's MacBook Pro's conflicted copy 2026-12-07 2)", E, Tool.DROPBOX,
     "2026-12-07", None, b"Pierre's MacBook Pro", 2),
    (E + b" (conflicted copy 2026-12-07)", E, Tool.DROPBOX, "2026-12-07", None, None, None),
    ("cryptfs (José's conflicted copy 2026-12-07).diriv".encode(), DIRIV, Tool.DROPBOX,
     "2026-12-07", None, "José".encode(), None),
    (E + b" (Case Conflict)", E, Tool.DROPBOX, None, None, None, None),
    (E + b" (case conflict 1)", E, Tool.DROPBOX, None, None, None, 1),
    (E + b" (Selective Sync Conflict)", E, Tool.DROPBOX, None, None, None, None),
    (E + b"-DESKTOP-4KJ9P2A", E, Tool.ONEDRIVE, None, None, b"DESKTOP-4KJ9P2A", None),
    (E + b"-LAPTOP-2", E, Tool.ONEDRIVE, None, None, b"LAPTOP", 2),
    (b"cryptfs-LAPTOP.diriv", DIRIV, Tool.ONEDRIVE, None, None, b"LAPTOP", None),
    (LONG + b"-LAPTOP.name", SIDECAR, Tool.ONEDRIVE, None, None, b"LAPTOP", None),
    (E + b"-kei-safeBackup-0001", E, Tool.ONEDRIVE_LINUX, None, None, b"kei", 1),
    (b"cryptfs-kei.example.org-safeBackup-0002.diriv", DIRIV, Tool.ONEDRIVE_LINUX,
     None, None, b"kei.example.org", 2),
    (E + b" (1)", E, Tool.GOOGLE_DRIVE, None, None, None, 1),
    (b"cryptfs (2).diriv", DIRIV, Tool.GOOGLE_DRIVE, None, None, None, 2),
    (E + b" (SFConflict alice@example.com 2026-12-07-10-15-00)", E, Tool.SEAFILE,
     "2026-12-07", "10:15:00", b"alice@example.com", None),
    (b"cryptfs (SFConflict 2026-12-07-10-15-00).diriv", DIRIV, Tool.SEAFILE,
     "2026-12-07", "10:15:00", None, None),
    (E + b".Conflict", E, Tool.RESILIO, None, None, None, None),
    (E + b".Conflict1", E, Tool.RESILIO, None, None, None, 1),
    (E + b".Conflict 3", E, Tool.RESILIO, None, None, None, 3),
    (b"cryptfs.Conflict.diriv", DIRIV, Tool.RESILIO, None, None, None, None),
    (E + b".conflict1", E, Tool.RCLONE_BISYNC, None, None, None, 1),
    (E + b".conflict12", E, Tool.RCLONE_BISYNC, None, None, None, 12),
    (E + b".path2", E, Tool.RCLONE_BISYNC, None, None, None, 2),
    (b"cryptfs.conflict2.diriv", DIRIV, Tool.RCLONE_BISYNC, None, None, None, 2),
    (SIDECAR + b".conflict1", SIDECAR, Tool.RCLONE_BISYNC, None, None, None, 1),
    (E + b"..path1", E, Tool.RCLONE_BISYNC_LEGACY, None, None, None, 1),
    (b"cryptfs.diriv..path2", DIRIV, Tool.RCLONE_BISYNC_LEGACY, None, None, None, 2),
]


@pytest.mark.parametrize(("name", "original", "tool", "date", "time", "device", "counter"),
                         REAL, ids=[f"{r[2].value}-{i}" for i, r in enumerate(REAL)])
def test_every_tool_pattern_parses(name, original, tool, date, time, device, counter):
    copy = parse(name)
    assert copy == ConflictCopy(
        name=name, original=original, kind=backing_kind(original), tool=tool,
        marker=copy.marker if copy else b"", date=date, time=time, device=device,
        counter=counter)
    assert copy.marker in name and name.replace(copy.marker, b"", 1) == original


def test_kinds():
    assert [parse(n).kind for n in (E + b" (1)", LONG + b" (1)", SIDECAR + b" (1)",
                                    b"cryptfs (1).diriv")] == [
        Kind.ENCODED, Kind.LONGNAME, Kind.SIDECAR, Kind.DIRIV]


# --- near misses: foreign names, damaged markers, valid backing names --------------

NEAR_MISSES = [
    # ordinary foreign files and plaintext conflict copies of them
    b"notes.txt", b"desktop.ini", b".DS_Store", b"Thumbs.db", b"~$report.docx",
    b"report (conflicted copy 2026-12-07 101500).txt",
    b"report.sync-conflict-20261207-101500-ABCDEFG.txt",
    b"report (Ken's conflicted copy 2026-12-07).txt", b"report (1).txt",
    b"report-LAPTOP.txt", b"report.conflict1", b"report..path1",
    # sync tools' temporary files
    b".syncthing." + E + b".tmp", b"~syncthing~." + E + b".tmp", b".~tmp~" + E,
    b"." + E + b".~1a2b", E + b".part", E + b".tmp",
    # damaged or near markers on a valid original
    E + b".sync-conflict-20261307-101500-ABCDEFG",  # month 13
    E + b".sync-conflict-20261207-246000-ABCDEFG",  # 24:60
    E + b".sync-conflict-20261207-101500-ABCDEF",  # short device ID
    E + b".sync-conflict-20261207-101500-abcdefg",  # not base32
    E + b".sync-conflict-20261207-101500-ABCDEFG8",
    E + b".sync-conflict-20261207-101500-ABCDEFGX",
    E + b".sync-conflict-20261207-101500",
    E + b" (conflicted copy 2026-12-07 10150)",
    E + b" (conflicted copy jo(e) 2026-12-07 101500)",
    E + b" (conflicted copy 2026-02-30 101500)",
    E + b"(conflicted copy 2026-12-07 101500)",
    E + b" (conflicted copy 2026-12-07 101500",
    E + b"_conflict-2026127-101500", E + b"_conflicted-20261207-101500",
    E + b" (Ken's conflicted copy 2026-12-07 1000)", E + b" (Ken's copy 2026-12-07)",
    E + b"-", E + b"--LAPTOP", E + b"-LAPTOP-", E + b"-LAP.TOP", E + b"-" + b"A" * 64,
    E + b" (case clash from 2026-12-07)", E + b" (case clash 2026-12-07 101500)",
    E + b"(1)", E + b" (0)", E + b" (1) ", E + b" (01)", E + b" ()",
    E + b" (SFConflict 2026-12-07 10-15-00)", E + b" (SFConflict a b 2026-12-07-10-15-00)",
    E + b".conflict", E + b".conflict0", E + b".Conflict0", E + b".CONFLICT1",
    E + b"..path3", E + b"..path", E + b".path",
    E + b".Conflict.txt", E + b".conflict1.txt", b"cryptfs.Conflict.txt",
    E + b".sync-conflict-20261207-101500-ABCDEFG.",
    # markers on something that is not a backing name
    E[:-1] + b" (1)", E[:-2] + b".conflict1", E + b"A (1)", b"x" + E + b" (1)",
    b"cryptfs.dirv (1)", b"cryptfs.diriv.name (1)", b"Cryptfs.diriv (1)",
    b"cryptfs.conf (1)", b"cryptfs.lock.conflict1", b"cryptfs (1).conf",
    LONG[:-1] + b" (1)", LONG + b"A (1)", SIDECAR + b"s (1)", b"cryptfs.longname. (1)",
    b".sync-conflict-20261207-101500-ABCDEFG", b" (1)", b"-LAPTOP", b".conflict1", b"",
    # valid backing names themselves
    E, LONG, SIDECAR, DIRIV,
]


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_misses_do_not_parse(name):
    assert parse(name) is None
    assert list(candidates(name)) == []


def test_names_of_impossible_length_do_not_parse():
    assert parse(E + b" (1)" + b"x" * 300) is None
    assert parse(b"A" * 254 + b" (1)") is None


# --- base64url markers: the length rule and the foreign flag ------------------------


def test_a_copy_shaped_like_an_encoded_name_needs_the_foreign_flag():
    """OneDrive's Linux client on a three-letter host makes a 64-character
    copy of a 43-character name: the shape of a real encoded name.  It only
    parses once the caller says the name did not decrypt."""
    name = E + b"-kei-safeBackup-0001"
    short = E + b"-ab-safeBackup-0001"
    assert len(name) == 63 and backing_kind(name) is None and parse(name).original == E
    name = E + b"-kei1-safeBackup-0001"
    assert backing_kind(name) is Kind.ENCODED  # 64 characters
    assert parse(name) is None
    copy = parse(name, foreign=True)
    assert copy is not None and copy.original == E and copy.device == b"kei1"
    assert parse(short).original == E


def test_owncloud_legacy_marker_never_gives_an_encoded_shape():
    """25 characters added to any valid encoded length never give another."""
    lengths = {len(backing(b"x" * n)[0]) for n in range(1, 160)}
    assert len(lengths) > 5
    assert all(backing_kind(b"A" * (n + 25)) is None for n in lengths
               if n + 25 <= NAME_MAX)


def test_several_readings_likeliest_first():
    """A copy of a name whose own characters could start a OneDrive marker
    (a "-" where a shorter encoded name could end): every reading is
    offered, the longest original first; the caller keeps the one that
    decrypts."""
    inner = next(e for e in (backing(b"q" * n)[0] for n in range(40, 48))
                 if len(e) == 86 and backing_kind(e[:42] + b"A") is not None)
    original = inner[:42] + b"A-" + inner[44:]  # still canonical: 86 characters
    assert backing_kind(original) is Kind.ENCODED
    readings = [c.original for c in candidates(original + b"-PC", foreign=True)]
    assert readings == [original, original[:43]]
    assert parse(original + b"-PC").original == original


# --- property: every tool, random names -----------------------------------------------

plaintexts = st.binary(min_size=1, max_size=NAME_MAX).filter(
    lambda n: n not in (b".", b"..") and b"/" not in n and b"\x00" not in n)
dir_ivs = st.binary(min_size=16, max_size=16)
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def words(alphabet: str, min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    return st.text(alphabet, min_size=min_size, max_size=max_size).map(str.encode)


hosts = st.one_of(words(ALNUM, 1, 15),  # NetBIOS names: up to 15 characters
                  st.tuples(words(ALNUM, 1, 6), words(ALNUM, 1, 8)).map(b"-".join))
users = words("abcdefghijklmnopqrstuvwxyz0123456789._", 1, 20)
short_ids = words("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 7, 7)
emails = st.tuples(words("abcdefghij0123456789.", 1, 12), words("abcdefgh", 1, 8)).map(
    lambda parts: parts[0] + b"@" + parts[1] + b".org")
whens = st.datetimes(min_value=datetime.datetime(2000, 1, 1),
                     max_value=datetime.datetime(2099, 12, 31)).map(
    lambda t: t.replace(microsecond=0))

DEVICES = {
    Tool.SYNCTHING: short_ids, Tool.NEXTCLOUD: st.one_of(st.just(b""), users),
    Tool.OWNCLOUD_LEGACY: st.one_of(st.just(b""), users),
    Tool.DROPBOX: st.sampled_from([b"Ken", b"Pierre's MacBook Pro", "José".encode()]),
    Tool.ONEDRIVE: hosts,
    Tool.ONEDRIVE_LINUX: st.one_of(hosts, hosts.map(lambda h: h + b".example.org")),
    Tool.SEAFILE: st.one_of(st.just(b""), emails),
}


@st.composite
def conflict_copies(draw):
    """(original backing name, tool, conflict copy's name)."""
    plain = draw(plaintexts)
    entry, sidecar = backing(plain, draw(dir_ivs))
    original = draw(st.sampled_from([entry, sidecar or entry, DIRIV]))
    tool = draw(st.sampled_from(list(Tool)))
    name = make_conflict(tool, original, device=draw(DEVICES.get(tool, st.just(b""))),
                         number=draw(st.integers(1, 999)), when=draw(whens),
                         before_dot=draw(st.booleans()))
    return original, tool, name


@given(conflict_copies())
def test_every_tool_copy_of_any_backing_name_is_recognised(case):
    original, tool, name = case
    assume(len(name) <= NAME_MAX)
    foreign = backing_kind(name) is not None  # see the foreign-flag test
    copy = parse(name, foreign=foreign)
    assert copy is not None, name
    assert copy.original == original
    assert copy.kind is backing_kind(original)
    assert copy.tool is tool or {copy.tool, tool} <= {Tool.ONEDRIVE, Tool.ONEDRIVE_LINUX}


@given(plaintexts, dir_ivs)
def test_no_valid_backing_name_parses(plain, dir_iv):
    entry, sidecar = backing(plain, dir_iv)
    encoded = NAMES.encode(dir_iv, plain).encode()
    for name in (entry, sidecar, encoded):
        if name is not None and len(name) <= NAME_MAX:
            assert parse(name) is None
            assert list(candidates(name)) == []


# --- the name shown in the mount -------------------------------------------------------


def copy_of(tool=Tool.SYNCTHING, date="2026-12-07", device=b"laptop") -> ConflictCopy:
    return ConflictCopy(name=b"x", original=E, kind=Kind.ENCODED, tool=tool,
                        marker=b"", date=date, device=device)


def free(_name: bytes) -> bool:
    return False


@pytest.mark.parametrize(("plain", "copy", "shown"), [
    (b"report.txt", copy_of(), b"report (conflict 2026-12-07 laptop).txt"),
    (b"report", copy_of(), b"report (conflict 2026-12-07 laptop)"),
    (b".bashrc", copy_of(), b".bashrc (conflict 2026-12-07 laptop)"),
    (b"archive.tar.gz", copy_of(), b"archive.tar (conflict 2026-12-07 laptop).gz"),
    (b"trailing.", copy_of(), b"trailing. (conflict 2026-12-07 laptop)"),
    (b"a.very-long-tail-not-an-ext", copy_of(),
     b"a.very-long-tail-not-an-ext (conflict 2026-12-07 laptop)"),
    (b"Notes v2. final", copy_of(), b"Notes v2. final (conflict 2026-12-07 laptop)"),
    (b"photo.jpg", copy_of(Tool.GOOGLE_DRIVE, None, None), b"photo (conflict).jpg"),
    (b"photo.jpg", copy_of(Tool.DROPBOX, "2026-12-07", b"Ken"),
     b"photo (conflict 2026-12-07 Ken).jpg"),
    (b"a.txt", copy_of(device=b"x/y"), b"a (conflict 2026-12-07 x_y).txt"),
])
def test_display_name(plain, copy, shown):
    assert display_name(plain, copy, free) == shown


def test_display_name_numbers_until_free():
    used = {b"report (conflict 2026-12-07 laptop).txt",
            b"report (conflict 2026-12-07 laptop 2).txt"}
    asked = []

    def taken(name: bytes) -> bool:
        asked.append(name)
        return name in used

    assert display_name(b"report.txt", copy_of(), taken) == \
        b"report (conflict 2026-12-07 laptop 3).txt"
    assert len(asked) == 3


def test_display_name_gives_up_when_everything_is_taken():
    with pytest.raises(ValueError):
        display_name(b"report.txt", copy_of(), lambda _name: True)


def test_display_name_shortens_the_stem_not_the_marker():
    plain = b"x" + "é".encode() * 125 + b".txt"  # 255 bytes
    shown = display_name(plain, copy_of(), free)
    assert len(shown) == NAME_MAX - 1  # 222 bytes of stem would split an é
    assert shown.endswith(b" (conflict 2026-12-07 laptop).txt")
    shown.decode("utf-8")  # no character was cut in half


def test_display_name_bounds_a_long_device_name():
    shown = display_name(b"a.txt", copy_of(device=b"D" * 300), free)
    assert shown == b"a (conflict 2026-12-07 " + b"D" * 64 + b").txt"


@given(plaintexts, st.sampled_from([copy_of(), copy_of(Tool.GOOGLE_DRIVE, None, None),
                                    copy_of(device="é".encode() * 40)]),
       st.integers(0, 5))
def test_display_name_is_a_valid_unique_name(plain, copy, n_taken):
    taken_names: set[bytes] = set()
    for _ in range(n_taken):
        taken_names.add(display_name(plain, copy, taken_names.__contains__))
    shown = display_name(plain, copy, taken_names.__contains__)
    check_name(shown)
    assert shown not in taken_names and shown != plain
    assert b"(conflict" in shown
    _, dot, ext = plain.rpartition(b".")
    if dot and 0 < len(ext) <= 16 and b" " not in ext and plain.rfind(b".") > 0:
        assert shown.endswith(b"." + ext)
