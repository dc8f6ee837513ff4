"""Tools over a cipher directory or the engines: fsck, speed."""
