"""Building a reverse mount: key file → engine → codec → view → operations.

The reverse counterpart of ``mount.assemble``; ``mount.mounted`` and
``mount.serve`` run it like a forward mount.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptfs.content.codec import ContentCodec
from cryptfs.content.sessions import SessionCache
from cryptfs.engines import DEFAULTS, select_engine
from cryptfs.engines.base import EngineOptions, XtsEngine
from cryptfs.fs.ops import MountOptions
from cryptfs.fs.workers import WorkerPool
from cryptfs.keys.hierarchy import KeyRing
from cryptfs.keys.keyfile import FEATURE_AUTHENTICATED, FEATURE_BOUND_METADATA
from cryptfs.names.metadata import MetadataCipher
from cryptfs.reverse.exclude import Excluder
from cryptfs.reverse.ops import ReverseOperations
from cryptfs.reverse.plain import PlainTree
from cryptfs.reverse.view import ReverseView


@dataclass
class ReverseStack:
    """What ``mount.mounted`` and ``mount.serve`` need of a stack."""

    operations: ReverseOperations
    engine: XtsEngine
    sessions: SessionCache
    plain: PlainTree
    workers: WorkerPool
    excluder: Excluder  # what the view leaves out (the control socket's map follows it)

    @property
    def handles(self) -> dict:  # open files, for --idle
        return self.operations.handles

    def close(self) -> None:
        self.workers.close()
        self.operations.close()
        self.plain.close()
        self.sessions.close()
        self.engine.close()


def build_reverse_stack(plaindir: Path, keyfile: Path, keys: KeyRing, engine_name: str,
                        options: MountOptions, features: Collection[str],
                        patterns: Sequence[str] = (),
                        engine_options: EngineOptions = DEFAULTS) -> ReverseStack:
    engine = select_engine(engine_name, engine_options).engine
    return assemble_reverse(plaindir, keyfile, keys, engine, options, features, patterns)


def assemble_reverse(plaindir: Path, keyfile: Path, keys: KeyRing, engine: XtsEngine,
                     options: MountOptions, features: Collection[str],
                     patterns: Sequence[str] = ()) -> ReverseStack:
    """The view of ``plaindir`` under ``keys``; ``keyfile``: the key file
    (shown as ``cryptfs.conf``, never under its own name)."""
    plain = PlainTree(plaindir)
    st = keyfile.stat()
    excluder = Excluder(patterns, hidden=[(st.st_dev, st.st_ino)])
    sessions = SessionCache(engine, keys)
    codec = ContentCodec(keys, sessions, FEATURE_AUTHENTICATED in features)
    # Symlink nonces are always derived: the view must be the same every time.
    metadata = MetadataCipher(keys, FEATURE_BOUND_METADATA in features, convergent=True)
    view = ReverseView(plain, keyfile, keys, metadata, codec, excluder)
    workers = WorkerPool(options.worker_threads)
    if options.inline_max is None:  # what the engine needs, as for a forward mount
        options = replace(options, inline_max=engine.inline_max)
    ops = ReverseOperations(view, workers, options)
    return ReverseStack(ops, engine, sessions, plain, workers, excluder)
