"""The mount(8) convention: ``-o opt1,opt2=value`` into cryptfs options.

``mount -t fuse.cryptfs SRC DIR -o ...`` (through mount.fuse3) and
``mount.cryptfs SRC DIR -o ...`` (fstab type ``cryptfs``) both hand cryptfs
one comma-separated string.  It mixes cryptfs' own options, generic flags
that mount(8) and systemd use for themselves, and kernel mount flags that
FUSE applies.  This pure function sorts them; unknown options are a usage
error rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptfs.errors import OptionError

# cryptfs options that take a value, and flags.
VALUE_OPTIONS = {"passfile", "extpass", "engine", "idle", "fsname", "readahead",
                 "config", "exclude_from",  # these two: with reverse
                 "cache_timeout"}
FLAG_OPTIONS = {"ro", "rw", "allow_other", "recovery", "foreground", "no_xattr",
                "nonempty", "shared", "reverse"}
# Mount flags the kernel applies to a FUSE mount (libfuse passes them on).
FUSE_FLAGS = {"suid", "nosuid", "dev", "nodev", "exec", "noexec", "atime", "noatime",
              "relatime", "norelatime", "strictatime", "nodiratime", "diratime",
              "sync", "async", "dirsync", "lazytime", "nolazytime"}
# Options for mount(8), fstab and systemd themselves: meaningless to us.
IGNORED = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
           "nofail", "_netdev", "loop", "nosymfollow"}
IGNORED_PREFIXES = ("x-", "comment=", "helper=")


@dataclass
class ParsedOptions:
    values: dict[str, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    fuse: set[str] = field(default_factory=set)  # passed to the kernel mount

    @property
    def read_only(self) -> bool:
        return "ro" in self.flags


def parse_mount_options(text: str) -> ParsedOptions:
    parsed = ParsedOptions()
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, has_value, value = item.partition("=")
        if key in VALUE_OPTIONS:
            if not has_value or not value:
                raise OptionError(f"mount option {key} needs a value ({key}=...)")
            parsed.values[key] = value
        elif key in FLAG_OPTIONS and not has_value:
            parsed.flags.add(key)
            if key == "rw":
                parsed.flags.discard("ro")
            elif key == "ro":
                parsed.flags.discard("rw")
        elif key in FUSE_FLAGS and not has_value:
            parsed.fuse.add(key)
        elif key in IGNORED or item.startswith(IGNORED_PREFIXES):
            continue
        else:
            raise OptionError(f"unknown mount option {item!r}")
    return parsed
