"""The stores every command is tested on: the local store and S3 (moto, boto3)."""

from __future__ import annotations

import pytest

from tests.conftest import Target, make_target


@pytest.fixture(params=["local", "moto-boto3"])
def target(request: pytest.FixtureRequest, tmp_path) -> Target:  # type: ignore[no-untyped-def]
    return make_target(request.param, request, tmp_path)
