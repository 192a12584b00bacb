"""Files on disk: layout and names, atomic commits, checksums, fast reads and writes, async saves."""
