"""The `shardckpt` command line."""
