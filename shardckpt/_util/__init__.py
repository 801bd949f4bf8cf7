"""Small helpers every layer may use: bytes and CRC32C views, durations, warning filters, Ctrl-C aborts, GC pauses."""
