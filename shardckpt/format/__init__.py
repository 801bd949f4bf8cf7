"""What a checkpoint is on the store: key layout, the manifest format and its checks, discovery of checkpoints."""
