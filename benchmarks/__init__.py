"""Side-by-side DCP checkpoint benchmarks: shardckpt against its peers on one local S3 server.

Run ``python -m benchmarks --help``. Modules, one question each:

- ``workloads``: what state is saved (bytes, tensors, ranks).
- ``systems``: how each system saves and loads it (one small class per system).
- ``s3util``: the boto3 helpers the peers and the harness share.
- ``measure``: how one call is timed and its peak memory taken.
- ``counting``: a loopback relay that counts S3 requests by operation.
- ``spawn``: running one function on N gloo ranks.
- ``worker``: what each rank does (reps, verification, request counts).
- ``harness``: the server, the workloads, and the results.
- ``report``: medians, ratios, the JSON file and the printed table; ``plot``: the figure.
"""
