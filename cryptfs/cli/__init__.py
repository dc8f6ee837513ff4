"""The command line: ``cryptfs`` (main.py: the parser and every command) and
``mount.cryptfs`` (mount(8)'s ``-o`` options, mountopts.py)."""

from cryptfs.cli.main import main, mount_helper_main

__all__ = ["main", "mount_helper_main"]
