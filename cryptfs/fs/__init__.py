"""The FUSE side: inode and handle tables, the backing tree, the operations."""
