"""File contents: the header, the page layout, and encrypted reads and writes."""
