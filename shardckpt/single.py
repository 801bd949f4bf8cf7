"""One-process, whole-object save and load: a drop-in for ``torch.save`` / ``torch.load``
to S3 (what people use s3torchconnector's ``S3Checkpoint`` for), with shardckpt's parallel
uploads, atomic commit and checksums.

Errors are shardckpt's own (``except Exception`` catches them), never DCP's
``CheckpointException`` (a BaseException) or its ``AssertionError`` for a missing manifest.
A save runs on a thread of its own while the caller waits, so that Ctrl-C reaches the wait:
the first lets the save finish, the second aborts it (``shardckpt._abort``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from shardckpt._abort import wait_or_abort
from shardckpt._quiet import single_process_dcp
from shardckpt.errors import CheckpointError, SaveFailedError, from_dcp
from shardckpt.reader import ShardReader
from shardckpt.writer import ShardWriter

_WRAPPED = "__shardckpt_object__"


def save(obj: Any, uri: str | os.PathLike[str], **options: Any) -> None:
    """Save ``obj`` (a state dict, or any tensor / nested container of tensors and picklable
    values) to ``uri`` as one checkpoint. Options as for :class:`ShardWriter`."""
    state = (
        obj
        if isinstance(obj, dict) and all(isinstance(k, str) for k in obj) and obj
        else {_WRAPPED: obj}
    )
    writer = ShardWriter(uri, **options)
    with single_process_dcp():
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="shardckpt-save") as pool:
                future = pool.submit(dcp.save, state, storage_writer=writer, no_dist=True)
                wait_or_abort(future, writer.abort_switch, f"the save to {writer.uri}")
        except CheckpointException as exc:
            raise from_dcp(exc, f"save to {writer.uri}", SaveFailedError)  # noqa: B904 (has its cause)


def load(
    uri: str | os.PathLike[str], *, map_location: str | torch.device | None = None, **options: Any
) -> Any:
    """Load what :func:`save` wrote (or any shardckpt checkpoint, consolidated into one
    process). ``map_location`` moves every tensor to that device. Options as for
    :class:`ShardReader` (``trusted``, ``endpoint``, ...)."""
    state: dict[str, Any] = {}
    reader = ShardReader(uri, **options)
    reader.read_metadata()  # a missing or bad manifest: our error, not DCP's AssertionError
    # dcp.load fills only keys the caller's dict already has; DCP's own consolidation
    # (format_utils.dcp_to_torch_save) uses this entry point to load everything (and, unlike
    # dcp.load, it does not warn that it runs in one process).
    try:
        _load_state_dict(
            state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True
        )
    except CheckpointException as exc:
        raise from_dcp(exc, f"load of {reader.uri}", CheckpointError)  # noqa: B904 (has its cause)
    if map_location is not None:
        state = _move(state, torch.device(map_location))
    return state[_WRAPPED] if set(state) == {_WRAPPED} else state


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_move(v, device) for v in value)
    return value
