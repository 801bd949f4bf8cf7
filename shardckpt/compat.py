"""Every torch internal that shardckpt uses, each behind one small function.

shardckpt supports a range of torch versions (``pyproject.toml``: ``torch>=2.11,<3``), and
torch changes its private names between minor releases without notice. So no other module
imports a private torch name or reaches into a torch object's private attributes
(``tests/test_compat.py`` scans the package for that); each use lives here, with why no public
API does the job. Where a public API does, the function is written with it. A torch release
that moves one of these names breaks one function here, which ``tests/test_compat.py`` calls
against the installed torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict as _flatten
from torch.distributed.checkpoint.default_planner import (
    _EmptyStateDictLoadPlanner,
    _validate_global_plan,
)
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.storage import StorageReader
from torch.distributed.tensor import DTensor


def flatten_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` flattened to DCP's fully qualified keys (``"model.layer.weight"``).

    Private (``torch.distributed.checkpoint._nested_dict``): the keys must be exactly the ones
    DCP's planners write into the metadata, so only DCP's own function will do."""
    return _flatten(state_dict)[0]


def narrow_to_chunk(
    tensor: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]
) -> torch.Tensor:
    """The part of ``tensor`` at ``offsets`` with ``sizes`` (a view).

    Public API: ``Tensor.narrow`` per dimension, what torch's private
    ``torch.distributed._shard._utils.narrow_tensor_by_index`` does."""
    for dim, (offset, size) in enumerate(zip(offsets, sizes, strict=True)):
        if size < tensor.size(dim):
            tensor = tensor.narrow(dim, offset, size)
    return tensor


def chunk_errors(plans: list[SavePlan], metadata: Metadata) -> list[str]:
    """DCP's own check of the chunks in ``metadata`` (in bounds, disjoint and, when ``plans``
    holds more than one plan, covering their tensor): one message per problem, none if valid.

    Private (``default_planner._validate_global_plan``; the public ``create_global_plan``
    would rebuild the metadata from write items). In torch 2.11 it returns a bool and only
    logs the problems; later releases return the messages (pytorch/pytorch#176728)."""
    found = _validate_global_plan(plans, metadata)
    if not isinstance(found, bool):
        return found
    keys = ", ".join(metadata.state_dict_metadata)
    return [] if found else [f"invalid chunks among {keys} (torch {torch.__version__} logs which)"]


def load_all(storage_reader: StorageReader) -> dict[str, Any]:
    """Everything the checkpoint behind ``storage_reader`` holds, loaded in this process.

    Private (``_load_state_dict`` with ``_EmptyStateDictLoadPlanner``, as DCP's own
    ``format_utils.dcp_to_torch_save`` does): the public ``dcp.load`` fills only keys the
    caller's dict already has."""
    state: dict[str, Any] = {}
    _load_state_dict(
        state,
        storage_reader=storage_reader,
        planner=_EmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    return state


def dtensor_like(template: DTensor, local: torch.Tensor) -> DTensor:
    """A DTensor with ``template``'s mesh, placements and global shape around ``local``.

    Private (the constructor and ``DTensor._spec``): the public ``DTensor.from_local`` moves
    ``local`` to the mesh's device, and a staged copy must stay in host memory."""
    return DTensor(local, template._spec, requires_grad=False)


def pin_host_memory(pointer: int, nbytes: int) -> int:
    """Page-lock ``nbytes`` of host memory at ``pointer`` in place; the CUDA error code (0: done).

    ``cudaHostRegister`` through ``torch.cuda.cudart()``, torch's binding of the CUDA runtime
    (not in torch's type stubs); the public ``Tensor.pin_memory`` copies into its own buffer,
    rounded up to a power of two."""
    return int(torch.cuda.cudart().cudaHostRegister(pointer, nbytes, 0))


def unpin_host_memory(pointer: int) -> None:
    """Undo :func:`pin_host_memory` (``cudaHostUnregister``)."""
    torch.cuda.cudart().cudaHostUnregister(pointer)
