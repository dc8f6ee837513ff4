"""Every ciphertext except file contents: file names (directory IVs, long
names), symlink targets and xattrs, and sync-tool conflict-copy names."""
