"""Making the boto3 S3 client a :class:`BotoS3Store` sends its requests through: one per
store, with botocore's retries and checksums off (the store's :class:`RetryPolicy` and
CRC32Cs do both) and without ``Expect: 100-continue``."""

from __future__ import annotations

import threading
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.handlers
import botocore.loaders
import botocore.session

from shardckpt.errors import ConfigError
from shardckpt.store.s3_config import S3Config

# A new botocore session parses the service models (JSON) for its first client: 0.1-0.5 s
# per store. Sessions share one loader, which caches them, so that is paid once per process;
# each store still gets a session of its own, so credentials are resolved afresh.
_LOADER = botocore.loaders.create_loader()
_SESSIONS_LOCK = threading.Lock()


def _session(profile: str | None) -> boto3.session.Session:
    core = botocore.session.get_session()
    core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core, profile_name=profile)


def boto_client(config: S3Config, endpoint: str | None, uri: str) -> Any:
    """A boto3 S3 client for ``config`` at ``endpoint`` (None: AWS). Raises
    :class:`ConfigError` naming ``uri`` if the AWS profile is not configured."""
    try:
        with _SESSIONS_LOCK:  # creating clients from one session is not thread-safe
            client = _session(config.profile).client(
                "s3",
                endpoint_url=endpoint,
                region_name=config.resolved_region(),
                config=botocore.config.Config(
                    s3={"addressing_style": "path" if endpoint else "auto"},
                    retries={"total_max_attempts": 1},
                    max_pool_connections=max(64, 4 * config.max_concurrency),
                    connect_timeout=config.connect_timeout,
                    read_timeout=config.read_timeout,
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
    except botocore.exceptions.ProfileNotFound as exc:
        raise _profile_error(exc, config, uri) from None
    # No "Expect: 100-continue" (botocore adds it to every S3 PUT): after any early final
    # response to it (an empty body on Go servers such as rclone and MinIO, or an early
    # 412/403), botocore mis-parses the next such response on that pooled connection,
    # which stalls for read_timeout and then retries (boto/botocore#3755).
    client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
    return client


def _profile_error(
    exc: botocore.exceptions.ProfileNotFound, config: S3Config, uri: str
) -> ConfigError:
    name = exc.kwargs.get("profile", config.profile)
    source = "" if config.profile else " (from AWS_PROFILE)"
    return ConfigError(
        f"{uri}: AWS profile {name!r}{source} is not configured: it is in neither "
        "the AWS config file nor the credentials file (~/.aws/config, ~/.aws/credentials, "
        "or AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE)"
    )
