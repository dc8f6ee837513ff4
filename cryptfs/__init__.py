"""cryptfs: a FUSE filesystem that stores only ciphertext (contents and names)."""

__version__ = "0.1.0"
