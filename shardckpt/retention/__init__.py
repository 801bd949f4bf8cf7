"""The one deletion policy (what shardckpt may delete, and when) and garbage collection."""
