"""The torch.distributed.checkpoint adapter: writer, reader, planner, host staging, incremental reuse."""
