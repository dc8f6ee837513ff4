"""Two real Syncthing instances on loopback sharing one folder, for tests of
cryptfs cipher directories kept in sync by a real sync tool.

Each instance has its own home (keys, config, index database) under the
test's tmp dir, a GUI/REST address and a sync listen address on 127.0.0.1
(free ports), and knows the other by its device ID and explicit tcp address.
Nothing leaves the machine: global and local discovery, relays, NAT, STUN,
usage and crash reporting and upgrades are off.  The folder is never watched
(fsWatcherEnabled off, no periodic rescan): changes are found only by the
scans ``sync()`` asks for over REST, so a test decides when each side looks.

The folder marker is the cipher directory's key file (``markerName``): a
folder with the default marker needs a ``.stfolder`` directory in its root,
which would sit in the cipher root beside cryptfs's own entries.  Syncthing
still writes ``.syncthing.NAME.tmp`` files beside the files it pulls, and
``NAME.sync-conflict-YYYYMMDD-HHMMSS-DEVICE7`` copies (the suffix goes
before the last extension of NAME, if any) for the losing side of a conflict.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_AFALG

FOLDER = "cipher"
START_TIMEOUT = 30.0  # seconds until the REST API answers
SYNC_TIMEOUT = 60.0  # seconds for sync() to settle
POLL = 0.1  # seconds between REST polls
OPTIONS = {  # config.xml <options>: nothing leaves the loopback, no background work
    "globalAnnounceEnabled": "false", "localAnnounceEnabled": "false",
    "relaysEnabled": "false", "natEnabled": "false", "startBrowser": "false",
    "urAccepted": "-1", "autoUpgradeIntervalH": "0", "crashReportingEnabled": "false",
    "announceLANAddresses": "false", "stunKeepaliveStartS": "0", "setLowPriority": "false",
    "reconnectionIntervalS": "1", "progressUpdateIntervalS": "-1",
}
FOLDER_OPTIONS = {  # the folder's child elements
    "ignoreDelete": "false", "modTimeWindowS": "0", "paused": "false",
}


def require_syncthing() -> str:
    """The syncthing binary; skip without it (fail where tools are required)."""
    path = shutil.which("syncthing")
    if path is None:
        message = "syncthing is not installed (scripts/setup installs it)"
        if REQUIRE_AFALG or os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SyncthingError(RuntimeError):
    pass


class Instance:
    """One Syncthing process with its home directory and REST client."""

    def __init__(self, name: str, home: Path, folder: Path) -> None:
        self.name, self.home, self.folder = name, home, folder
        self.gui_port, self.listen_port = free_port(), free_port()
        self.api_key = os.urandom(16).hex()
        self.proc: subprocess.Popen | None = None
        self.log_path = home / "syncthing.log"
        subprocess.run([require_syncthing(), "generate", "--home", str(home),
                        "--no-default-folder", "--skip-port-probing"],
                       check=True, capture_output=True)
        self.device_id = subprocess.run(
            ["syncthing", "serve", "--home", str(home), "--device-id"],
            check=True, capture_output=True, text=True).stdout.strip()

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.listen_port}"

    def configure(self, peer: Instance, marker: str) -> None:
        """Write config.xml: our addresses and options, the peer, the folder."""
        path = self.home / "config.xml"
        tree = ET.parse(path)
        root = tree.getroot()
        gui = root.find("gui")
        assert gui is not None
        _set(gui, "address", f"127.0.0.1:{self.gui_port}")
        _set(gui, "apikey", self.api_key)
        options = root.find("options")
        assert options is not None
        _set(options, "listenAddress", self.address)
        for key, value in OPTIONS.items():
            _set(options, key, value)
        device_template = root.find("defaults/device")
        folder_template = root.find("defaults/folder")
        assert device_template is not None and folder_template is not None
        remote = copy.deepcopy(device_template)
        remote.set("id", peer.device_id)
        remote.set("name", peer.name)
        _set(remote, "address", peer.address)
        root.insert(1, remote)
        folder = copy.deepcopy(folder_template)
        folder.attrib.update({"id": FOLDER, "label": FOLDER, "path": str(self.folder),
                              "rescanIntervalS": "0", "fsWatcherEnabled": "false"})
        for device in folder.findall("device"):
            folder.remove(device)
        for device_id in (self.device_id, peer.device_id):
            ET.SubElement(folder, "device", {"id": device_id, "introducedBy": ""})
        for key, value in {**FOLDER_OPTIONS, "markerName": marker}.items():
            _set(folder, key, value)
        root.insert(0, folder)
        tree.write(path)

    def launch(self) -> None:
        """Start the process (``wait_up`` waits for its REST API)."""
        env = {**os.environ, "STNOUPGRADE": "1", "STNODEFAULTFOLDER": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["syncthing", "serve", "--home", str(self.home), "--no-browser",
                 "--no-restart", "--logflags=3", f"--gui-apikey={self.api_key}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)

    def wait_up(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise SyncthingError(f"{self.name} exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            with contextlib.suppress(OSError):
                if self.rest("GET", "/rest/system/ping").get("ping") == "pong":
                    return
            if time.monotonic() > deadline:
                raise SyncthingError(f"{self.name}'s REST API did not come up:\n{self.log()}")
            time.sleep(POLL)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.rest("POST", "/rest/system/shutdown")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-40:])

    def rest(self, method: str, path: str, body: object = None) -> dict:
        """One REST call; the decoded JSON answer ({} when there is none)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.gui_port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"X-API-Key": self.api_key, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=SYNC_TIMEOUT) as answer:
                data = answer.read()
        except urllib.error.HTTPError as exc:
            raise SyncthingError(f"{self.name}: {method} {path}: {exc.code} "
                                 f"{exc.read().decode(errors='replace')}") from exc
        return json.loads(data) if data.strip() else {}

    def scan(self) -> None:
        """Scan the folder now (the call returns when the scan is done)."""
        self.rest("POST", f"/rest/db/scan?folder={FOLDER}")

    def status(self) -> dict:
        return self.rest("GET", f"/rest/db/status?folder={FOLDER}")

    def completion(self, peer: Instance) -> dict:
        return self.rest("GET", f"/rest/db/completion?folder={FOLDER}&device={peer.device_id}")

    def connected(self, peer: Instance) -> bool:
        connections = self.rest("GET", "/rest/system/connections")["connections"]
        return bool(connections.get(peer.device_id, {}).get("connected"))


def _set(parent: ET.Element, tag: str, text: str) -> None:
    element = parent.find(tag)
    if element is None:
        element = ET.SubElement(parent, tag)
    element.text = text


class SyncthingPair:
    """Two instances sharing the folder FOLDER: ``a.folder`` and ``b.folder``."""

    def __init__(self, a: Instance, b: Instance) -> None:
        self.a, self.b = a, b

    def _pairs(self) -> tuple[tuple[Instance, Instance], tuple[Instance, Instance]]:
        return (self.a, self.b), (self.b, self.a)

    def wait_connected(self, timeout: float = SYNC_TIMEOUT) -> None:
        self._wait(lambda: all(x.connected(y) for x, y in self._pairs()), timeout,
                   "the instances to connect")

    def wait_disconnected(self, timeout: float = SYNC_TIMEOUT) -> None:
        """Until A sees B gone (B is stopped)."""
        self._wait(lambda: not self.a.connected(self.b), timeout, "A to see B disconnect")

    def _wait(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise SyncthingError(f"timed out waiting for {what}:\n{self.a.log()}\n"
                                     f"{self.b.log()}")
            time.sleep(POLL)

    @contextlib.contextmanager
    def apart(self) -> Iterator[None]:
        """B stopped for the block, as a machine that is offline: changes made
        meanwhile on each side are concurrent.  A scans its changes before B
        comes back; B finds its own in the scan it makes when it starts.
        (Pausing the devices over REST is racy: a side that resumes first
        dials a peer still paused, is refused, and backs off for long.)"""
        self.b.stop()
        self.wait_disconnected()
        yield
        self.a.scan()
        self.b.launch()
        self.b.wait_up()
        self.wait_connected()

    def sync(self, timeout: float = SYNC_TIMEOUT) -> None:
        """Scan both sides, then wait until both are idle, need nothing, see
        the other 100% complete, and a further round of scans changes no
        local sequence (pulled conflict copies are scanned and sent too)."""
        deadline = time.monotonic() + timeout
        last: dict[str, object] = {}
        settled_at: tuple[int, int] | None = None
        while True:
            for side in (self.a, self.b):
                side.scan()
            states = {side.name: (side.status(), side.completion(peer))
                      for side, peer in self._pairs()}
            last = {name: {"state": s["state"], "sequence": s["sequence"],
                           "needTotalItems": s["needTotalItems"],
                           "completion": c["completion"], "peerNeedItems": c["needItems"]}
                    for name, (s, c) in states.items()}
            quiet = all(s["state"] == "idle" and s["needTotalItems"] == 0
                        and c["completion"] == 100 and c["needItems"] == 0
                        for s, c in states.values())
            sequences = (states[self.a.name][0]["sequence"], states[self.b.name][0]["sequence"])
            if quiet and sequences == settled_at:
                return
            settled_at = sequences if quiet else None
            if time.monotonic() > deadline:
                raise SyncthingError(f"sync did not settle in {timeout} s; last states: "
                                     f"{json.dumps(last)}\n{self.a.log()}\n{self.b.log()}")
            time.sleep(POLL)


@contextlib.contextmanager
def syncthing_pair(base: Path, folder_a: Path, folder_b: Path,
                   marker: str = ".stfolder") -> Iterator[SyncthingPair]:
    """Start two instances (homes under ``base``) sharing ``folder_a`` and
    ``folder_b``, connected; stop both at the end.  ``marker``: a file or
    directory that exists in both folders' roots (for a cipher directory, its
    key file: then Syncthing adds nothing to the root)."""
    require_syncthing()
    a = Instance("A", base / "home-a", folder_a)
    b = Instance("B", base / "home-b", folder_b)
    for side, peer, folder in ((a, b, folder_a), (b, a, folder_b)):
        if marker == ".stfolder":
            (folder / marker).mkdir(parents=True, exist_ok=True)
        side.configure(peer, marker)
    with contextlib.ExitStack() as stack:
        for side in (a, b):  # both start at once, then both are waited for
            stack.callback(side.stop)
            side.launch()
        for side in (a, b):
            side.wait_up()
        pair = SyncthingPair(a, b)
        pair.wait_connected()
        yield pair


def conflict_copies(directory: Path, name: str) -> list[Path]:
    """The sync-conflict copies of ``name`` in ``directory``."""
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    return sorted(p for p in directory.iterdir()
                  if p.name.startswith(f"{stem}.sync-conflict-") and p.name.endswith(dot + ext))
