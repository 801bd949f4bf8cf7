"""The training-loop engine: the Checkpointer (async saves, resume, retention)."""
