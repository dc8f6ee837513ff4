"""log.Once: each recurring problem logged once, in bounded memory."""

from __future__ import annotations

from cryptfs.lowlevel.log import Once


def test_once_per_key_and_bounded():
    once = Once(limit=2)
    assert once.first("a") and not once.first("a")
    assert once.first("b") and once.first("c")  # full: "a", met least recently, is forgotten
    assert not once.first("b") and not once.first("c")
    assert once.first("a")  # logged again rather than never
