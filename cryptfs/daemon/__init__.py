"""The daemon's life: assembling the stack and serving it, the request loop,
detaching, the mount lock, the mount point."""
