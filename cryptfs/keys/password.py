"""Where a password comes from: a file, a command, or the terminal."""

from __future__ import annotations

import getpass
import logging
import os
import stat
import subprocess
import sys

from cryptfs.errors import PasswordSourceError

log = logging.getLogger(__name__)



def from_file(path: str) -> bytes:
    """The first line of ``path`` (without its newline)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            line = f.readline()
    except OSError as exc:
        raise PasswordSourceError(f"cannot read the password file {path}: {exc.strerror}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("password file %s is accessible by other users (chmod 600 it)", path)
    return line.rstrip(b"\r\n")


def from_command(command: str) -> bytes:
    """The first line a command prints (run with /bin/sh: works with mount's empty PATH)."""
    env = dict(os.environ)
    env["PATH"] = env.get("PATH") or "/usr/local/bin:/usr/bin:/bin"
    try:
        proc = subprocess.run(["/bin/sh", "-c", command], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, env=env, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PasswordSourceError(f"the extpass command failed: {exc}") from exc
    if proc.returncode != 0:
        raise PasswordSourceError(f"the extpass command exited with {proc.returncode}")
    return proc.stdout.split(b"\n", 1)[0].rstrip(b"\r")


def from_terminal(prompt: str, confirm: bool = False) -> bytes:
    if not sys.stdin.isatty():
        raise PasswordSourceError(
            "no terminal to ask for the password: use --passfile or --extpass")
    password = getpass.getpass(prompt).encode()
    if confirm and getpass.getpass("Repeat: ").encode() != password:
        raise PasswordSourceError("the passwords do not match")
    return password


def get_password(passfile: str | None = None, extpass: str | None = None,
                 prompt: str = "Password: ", confirm: bool = False) -> bytes:
    if passfile and extpass:
        raise PasswordSourceError("give either a password file or a command, not both")
    if passfile:
        password = from_file(passfile)
    elif extpass:
        password = from_command(extpass)
    else:
        password = from_terminal(prompt, confirm)
    if not password:
        raise PasswordSourceError("the password is empty")
    return password
