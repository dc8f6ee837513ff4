"""System helpers, the bottom layer: Linux calls the standard library lacks,
lazily started threads, logging."""
