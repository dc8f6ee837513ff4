"""The command line: ``cryptfs`` and ``mount.cryptfs``.  main.py holds the
parser and ``main()``; each command group has its module (cipherdir.py,
mounting.py, checks.py), and mountopts.py reads mount(8)'s ``-o`` options."""

from cryptfs.cli.main import main, mount_helper_main

__all__ = ["main", "mount_helper_main"]
