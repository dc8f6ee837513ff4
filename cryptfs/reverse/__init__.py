"""Reverse mode: a read-only, encrypted view of a plaintext directory.

The view is the cipher directory a forward mount would have written for
that tree, computed on the fly and the same on every mount (the values
forward mode draws at random are derived: ``keys/reverse.py``).  Copy it
anywhere and a forward mount of the copy shows the plaintext tree.

``plain`` walks the plaintext tree by descriptor, ``exclude`` decides what
is left out, ``names``, ``content``, ``xattrs`` seal what the view shows,
``view`` puts them together per entry, ``nodes`` numbers the entries and
``ops`` answers the kernel.  The daemon assembles them
(``daemon/reverse.py``).
"""
