"""The control socket: a running mount answers ``cryptfs path`` without
the password (docs/design.md, "The control socket").

The mount listens on a Unix socket in a directory only its owner can open
(``socket_path``), and answers only its owner's and root's processes
(``SO_PEERCRED``): the map between plaintext and backing paths is what the
mount shows anyway to whoever may use it.  The protocol is one JSON object a
line each way: ``{"op": "encrypt"|"decrypt", "path": PATH}``, answered by
``{"ok": true, ...the mapper's answer}`` or ``{"ok": false, "error": TEXT,
"exit": CODE}``.  Paths are ``os.fsdecode``'d bytes, sent with JSON's
``\\u`` escapes, so any name survives.

What answers is a *mapper*, given by whoever mounts (the forward and the
reverse mount each have one in ``tools/pathmap.py``): this module knows
nothing of paths.  It runs in a worker thread, one request at a time, never
on the event loop; one bad request or client gets an error and never harms
the mount.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import trio

from cryptfs.errors import CryptfsError, ExitCode, MountError, UsageError

log = logging.getLogger(__name__)

# (op, path) -> a JSON-able answer; raises CryptfsError for a bad request.
Mapper = Callable[[str, str], Mapping[str, object]]

OPS = ("encrypt", "decrypt")
USER_RUNTIME = Path("/run/user")  # logind's per-user directories (0700, the user's)
ROOT_RUNTIME = Path("/run/cryptfs")  # root's, and anyone's without a logind directory
MAX_REQUEST = 64 * 1024  # bytes in one request line (a path is at most a few KiB)
MAX_REPLY = 16 * 1024 * 1024  # bytes the client accepts in one reply
MAX_CLIENTS = 8  # connections served at once; more are closed at once
IDLE_SECONDS = 30.0  # a connection silent (or not reading) that long is closed
CLIENT_TIMEOUT = 60.0  # the client's wait for one answer
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlSocketError(CryptfsError):
    """The control socket's directory or file is not safe to use."""

    exit_code = ExitCode.MOUNT


class SocketTakenError(ControlSocketError):
    """Another live mount of the directory (``--shared``) has the socket."""


class NoMountError(MountError):
    """No running mount of the directory answers this user."""


def socket_dir(uid: int) -> Path:
    """Where the sockets of ``uid``'s mounts live: under logind's runtime
    directory of the user where it exists, else ``/run/cryptfs/UID``.
    Computed, not read from the environment, so that a client in another
    session (or root) finds the same place."""
    runtime = USER_RUNTIME / str(uid)
    try:
        st = os.lstat(runtime)
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
        return runtime / "cryptfs"
    return ROOT_RUNTIME / str(uid)


def socket_path(directory: Path | str, uid: int) -> Path:
    """The socket of the mount of ``directory`` (a cipher directory, or a
    reverse mount's plaintext directory) by ``uid``: named by a hash of the
    directory's real path, so any path to it finds it."""
    real = os.fsencode(os.path.realpath(directory))
    return socket_dir(uid) / (hashlib.sha256(real).hexdigest()[:32] + ".sock")


# --- the server --------------------------------------------------------------------


class ControlSocket:
    """A listening control socket and the mapper that answers on it."""

    def __init__(self, sock: socket.socket, path: Path, mapper: Mapper) -> None:
        self.sock, self.path, self.mapper = sock, path, mapper
        self.owner = os.geteuid()
        self._ident = _ident(path)
        self._clients = 0

    async def serve(self) -> None:
        """Accept and answer until cancelled (the mount's nursery)."""
        listener = trio.socket.from_stdlib_socket(self.sock)
        limiter = trio.CapacityLimiter(1)  # one mapper call at a time
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _ = await listener.accept()
                except OSError as exc:  # EMFILE, say: the mount goes on
                    log.warning("control socket: accept failed: %s", exc)
                    await trio.sleep(1)
                    continue
                if self._clients >= MAX_CLIENTS:
                    conn.close()
                    continue
                self._clients += 1
                nursery.start_soon(self._client, conn, limiter)

    def close(self) -> None:
        """Close, and remove the socket file if it is still ours (a second
        mount of the same directory may have replaced it)."""
        self.sock.close()
        if _ident(self.path) == self._ident:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _client(self, conn: trio.socket.SocketType, limiter: trio.CapacityLimiter) -> None:
        stream = trio.SocketStream(conn)
        try:
            await self._converse(stream, _peer_uid(conn), limiter)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:  # never let one connection end the mount
            log.exception("control socket: internal error")
        finally:
            self._clients -= 1
            with contextlib.suppress(OSError, trio.BrokenResourceError,
                                     trio.ClosedResourceError):
                await stream.aclose()

    async def _converse(self, stream: trio.SocketStream, uid: int,
                        limiter: trio.CapacityLimiter) -> None:
        if uid not in (self.owner, 0):
            log.info("control socket: refused a process of uid %d", uid)
            await _send(stream, _error(f"uid {uid} may not use this mount's control "
                                       f"socket (only uid {self.owner} and root)",
                                       ExitCode.USAGE))
            return
        pending = b""
        while True:
            data = b""
            with trio.move_on_after(IDLE_SECONDS):
                data = await stream.receive_some(MAX_REQUEST)
            if not data:  # end of the requests, or silent too long
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                await _send(stream, await self._answer(line, limiter))
            if len(pending) > MAX_REQUEST:
                await _send(stream, _error(f"request longer than {MAX_REQUEST} bytes",
                                           ExitCode.USAGE))
                return

    async def _answer(self, line: bytes, limiter: trio.CapacityLimiter) -> dict:
        try:
            op, path = parse_request(line)
            answer = await trio.to_thread.run_sync(self.mapper, op, path, limiter=limiter)
        except CryptfsError as exc:
            return _error(str(exc), exc.exit_code)
        except Exception:  # a bug in the mapper: this request fails, the mount goes on
            log.exception("control socket: internal error answering a request")
            return _error("internal error (the mount's log says more)", ExitCode.INTERNAL)
        return {"ok": True, **answer}


def parse_request(line: bytes) -> tuple[str, str]:
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"request is not JSON: {exc}") from exc
    if not isinstance(request, dict) or request.get("op") not in OPS \
            or not isinstance(request.get("path"), str):
        raise UsageError('a request is {"op": "encrypt"|"decrypt", "path": PATH}')
    return request["op"], request["path"]


@contextlib.contextmanager
def control_socket(directory: Path, mapper: Mapper) -> Iterator[ControlSocket | None]:
    """The control socket of the mount of ``directory`` for the block, or
    None (with a warning) where it cannot be made: the mount works without
    it, and ``cryptfs path`` with the password too."""
    try:
        ctl = listen(directory, mapper)
    except SocketTakenError as exc:  # expected with --shared: that mount answers
        log.info("no control socket: %s", exc)
        ctl = None
    except (OSError, ControlSocketError) as exc:
        log.warning("no control socket (cryptfs path needs the password): %s", exc)
        ctl = None
    try:
        yield ctl
    finally:
        if ctl is not None:
            ctl.close()


def listen(directory: Path, mapper: Mapper) -> ControlSocket:
    """Bind under a temporary name, make it 0600, then rename it over the
    socket's name: a stale socket of a killed daemon is replaced, a live one
    (another mount of the same directory, ``--shared``) is left alone."""
    path = socket_path(directory, os.geteuid())
    private_dir(path.parent)
    sweep(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(os.fspath(tmp))
        os.chmod(tmp, 0o600)
        sock.listen(MAX_CLIENTS)
        if _live(path):
            raise SocketTakenError(f"{path} belongs to another running mount of {directory}")
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    log.debug("control socket: %s", path)
    return ControlSocket(sock, path, mapper)


def private_dir(path: Path) -> None:
    """Make ``path`` (mode 0700) and check it is ours and no one else's: a
    directory someone else made (or a symlink) is refused, not used."""
    uid = os.geteuid()
    if path.parent == ROOT_RUNTIME:
        ROOT_RUNTIME.mkdir(mode=0o755, exist_ok=True)  # only root can; others get the error
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise ControlSocketError(f"{path} is not a private directory of uid {uid} "
                                 f"(owner {st.st_uid}, mode {stat.filemode(st.st_mode)})")


def sweep(directory: Path) -> None:
    """Remove what killed daemons left here: sockets nobody listens on
    (of any directory's mount: /run outlives no reboot, but many mounts),
    and temporary names of processes that no longer exist."""
    for name in os.listdir(directory):
        path = directory / name
        if name.startswith("."):
            pid = name.rsplit(".", 1)[-1]
            if not pid.isdigit() or _process_exists(int(pid)):
                continue
        elif not name.endswith(".sock") or _live(path):
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
                log.debug("control socket: removed stale %s", path)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live(path: Path) -> bool:
    """Whether a daemon may answer on ``path``: only a refused connection
    (a killed daemon's file) or no file says no; a full backlog or any
    other error counts as alive, so a busy mount's socket is never taken."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(2)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True
    return True


def _ident(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _peer_uid(conn: trio.socket.SocketType) -> int:
    _pid, uid, _gid = _PEERCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid


def _error(text: str, code: int) -> dict:
    return {"ok": False, "error": text, "exit": int(code)}


async def _send(stream: trio.SocketStream, reply: dict) -> None:
    with trio.move_on_after(IDLE_SECONDS):  # a client that does not read is dropped
        await stream.send_all(encode(reply))
        return
    raise trio.ClosedResourceError("the client does not read")


def encode(message: Mapping[str, object]) -> bytes:
    """One line of the protocol (ASCII: names travel as ``\\u`` escapes)."""
    return json.dumps(message, ensure_ascii=True).encode("ascii") + b"\n"


# --- the client --------------------------------------------------------------------


def request(directory: Path | str, op: str, path: str) -> dict:
    """Ask the running mount of ``directory`` for the map of ``path``;
    ``MountError`` if there is none this user can reach, the mount's error
    (as a ``CryptfsError`` with its exit code) if it refuses."""
    sock = _connect(directory)
    with sock:
        sock.settimeout(CLIENT_TIMEOUT)
        sock.sendall(encode({"op": op, "path": path}))
        reply = _read_line(sock)
    try:
        answer = json.loads(reply)
    except ValueError as exc:
        raise MountError(f"the mount of {directory} sent a reply that is not JSON") from exc
    if not isinstance(answer, dict):
        raise MountError(f"the mount of {directory} sent an unexpected reply")
    if not answer.pop("ok", False):
        error = CryptfsError(str(answer.get("error", "refused")))
        with contextlib.suppress(ValueError, TypeError):
            error.exit_code = ExitCode(answer.get("exit"))
        raise error
    return answer


def _connect(directory: Path | str) -> socket.socket:
    """Connect to the mount's socket: this user's, and, for root, the
    socket of the directory's owner's mount too."""
    uids = [os.geteuid()]
    with contextlib.suppress(OSError):
        owner = os.stat(directory).st_uid
        if uids[0] == 0 and owner != 0:
            uids.append(owner)
    reasons = []
    for uid in uids:
        path = socket_path(directory, uid)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            continue
        except OSError as exc:
            sock.close()
            reasons.append(f"{path}: {exc.strerror}")
            continue
        return sock
    why = f" ({'; '.join(reasons)})" if reasons else ""
    raise NoMountError(f"no running mount of {directory} answers{why}: mount it, or give "
                     "the password (--passfile or --extpass)")


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(65536)
        except TimeoutError as exc:
            raise MountError("the mount did not answer in time") from exc
        if not chunk:
            raise MountError("the mount closed the connection without an answer")
        data += chunk
        if len(data) > MAX_REPLY:
            raise MountError("the mount's reply is too long")
    return data
