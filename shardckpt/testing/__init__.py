"""Local S3 servers for tests, demos and benchmarks (fixed loopback credentials): not for production."""
