"""Detaching from the terminal once the filesystem is mounted.

``cryptfs mount`` mounts first (``pyfuse3.init`` returns only when the
kernel has the mount), then forks: the parent exits 0, so ``mount`` and
scripts see a ready filesystem or a failure with its message; the child
carries on serving with its output sent to syslog.  No thread may exist yet
when we fork (trio and the worker threads start afterwards).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys


def detach() -> None:
    """Fork; the parent exits 0 at once, the child becomes a session leader
    with stdio on /dev/null and logs to syslog."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os._exit(0)  # not sys.exit: the parent must not run cleanup (unmount)
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    use_syslog()


def use_syslog() -> None:
    root = logging.getLogger()
    if os.path.exists("/dev/log"):
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("cryptfs[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.handlers[:] = [handler]
