"""torchtitan integration: ``ShardckptCheckpointManager``, a torchtitan (>= 0.3) checkpoint
manager backed by shardckpt's :class:`~shardckpt.Checkpointer`.

torchtitan's stock ``CheckpointManager`` saves with ``dcp.async_save(checkpoint_id=folder/step-N)``
and reaches S3 only through fsspec (DCP's ``FsspecWriter`` over s3fs): no commit point (a
step folder whose save died midway can look complete to another tool), a per-step scan of
the folder on resume, and a pickle-per-rank upload from the save thread. This manager keeps
torchtitan's contract and its rules, and hands the bytes to shardckpt: the training step is
blocked only for the host snapshot, upload and manifest commit run in the background, resume
lists manifests once, retention deletes only what shardckpt wrote.

Switching managers is a config change (the trainer's ``checkpoint`` field)::

    from shardckpt.integrations.torchtitan import ShardckptCheckpointManager

    config.checkpoint = ShardckptCheckpointManager.Config(
        enable=True, folder="s3://bucket/run", interval=500, keep_latest_k=3,
        endpoint="http://127.0.0.1:8333",  # or AWS_ENDPOINT_URL; None: AWS
    )

What is saved, and when, is torchtitan's own code, borrowed from its stock manager: the same
state (flattened model parts, optimizers, lr schedulers, dataloader, train state and any
``states`` the trainer adds), the same interval / first-step / last-step rules, the same
model-only seed checkpoint at step 0 and ``last_save_model_only`` export dtype, and the same
``load_step`` / ``exclude_from_loading``. When the folder holds no shardckpt checkpoint yet,
loading follows the stock manager's rules: a stock ``step-N`` DCP checkpoint in a local folder,
then ``initial_load_path`` (DCP or HF), else a fresh start; so a run saved by the stock manager
resumes under this one. (The stock manager cannot read shardckpt's format.)

``async_mode``: ``"async"`` (default) blocks for the snapshot only; ``"async_with_pinned_mem"``
also lets the device-to-host copy overlap the next forward/backward (torchtitan waits for it
in ``maybe_wait_for_staging`` before the optimizer step, and so does a hook on the optimizers);
``"disabled"`` waits for the commit in ``save``. The last step's save is always synchronous.

Differences from the stock manager, on purpose: ``close`` waits for the save in flight and
commits it (the stock one leaves it behind); a step that is already committed is never
overwritten (``CheckpointExistsError``); errors of a background save are raised by the next
``save`` / ``maybe_wait_for_saving`` / ``close``. ``last_save_in_hf`` is refused (use the
stock manager for an HF export). With ``preemption`` (default on) a SIGTERM is noted, every
rank agrees at the next ``save`` call (one small gloo collective per step), the state of that
step is saved and committed, and the process exits with status 143 (128 + SIGTERM), which
launchers and schedulers take as "terminated, restart me".
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.components.checkpointer import (
    DATALOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    BaseCheckpointManager,
    CheckpointManager,
    ModelWrapper,
)
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.tools import filesystem

from shardckpt.engine.background import SaveHandle
from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.errors import ConfigError

if TYPE_CHECKING:
    import torch.nn as nn
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
    from torchtitan.protocols.state_dict_adapter import BaseStateDictAdapter

logger = logging.getLogger(__name__)

_Stock = CheckpointManager  # torchtitan's DCP manager, whose state collection we borrow

# Policy fields of torchtitan's config the borrowed methods read from the manager.
_POLICY = (
    "interval",
    "load_only",
    "exclude_from_loading",
    "initial_load_path",
    "initial_load_model_only",
    "initial_load_in_hf",
    "initial_load_in_hf_quantized",
    "enable_first_step_checkpoint",
    "last_save_model_only",
    "last_save_in_hf",
    "keep_latest_k",
)
PREEMPTED_EXIT = 128 + signal.SIGTERM


class ShardckptCheckpointManager(BaseCheckpointManager):
    """A torchtitan checkpoint manager that saves through shardckpt (see the module doc)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):
        """torchtitan's checkpoint policy, plus where and how shardckpt writes.

        ``folder``: ``s3://bucket/prefix`` (used as is) or a path (joined to the trainer's
        dump folder, as the stock manager does). ``endpoint`` / ``region``: the S3 endpoint
        URL and region (default: ``AWS_ENDPOINT_URL`` / ``AWS_REGION``, else AWS and
        us-east-1). ``transport``: ``"boto3"`` or ``"crt"`` (default: shardckpt's, boto3).
        ``incremental``: upload only items whose bytes the newest checkpoint lacks.
        ``preemption``: on SIGTERM, save at the next step and exit (see the module doc).
        """

        async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = "async"
        """Blocking of a periodic save: snapshot only, snapshot overlapped, or commit."""

        endpoint: str | None = None
        """S3 endpoint URL (MinIO, SeaweedFS, ...); None: AWS_ENDPOINT_URL or AWS."""

        region: str | None = None
        """S3 region; None: AWS_REGION, else us-east-1."""

        transport: Literal["boto3", "crt"] | None = None
        """S3 client: boto3 (shardckpt's default) or the AWS CRT."""

        incremental: bool = False
        """Upload only items whose bytes the newest committed checkpoint lacks."""

        preemption: bool = True
        """On SIGTERM: save the state at the next step on every rank, commit, exit 143."""

        def __post_init__(self) -> None:
            BaseCheckpointManager.Config.__post_init__(self)
            if self.async_mode not in ("disabled", "async", "async_with_pinned_mem"):
                raise ConfigError(f"checkpoint.async_mode: unknown mode {self.async_mode!r}")
            if self.last_save_in_hf:
                raise ConfigError(
                    "checkpoint.last_save_in_hf is not supported by ShardckptCheckpointManager: "
                    "export HF safetensors with torchtitan's CheckpointManager"
                )

    # torchtitan's own state collection and rules, shared with its stock manager: the same
    # keys, the same model-only seed step, the same interval, the same fallback loads.
    _flattened_model_states_sd = _Stock._flattened_model_states_sd
    _states_to_load = _Stock._states_to_load
    _should_save = _Stock._should_save
    _find_load_step = _Stock._find_load_step
    _create_checkpoint_id = _Stock._create_checkpoint_id
    _stock_load = _Stock._load
    dcp_load = _Stock.dcp_load

    def __init__(
        self,
        config: Config,
        *,
        dataloader: BaseDataLoader | None,
        model_parts: list[nn.Module],
        optimizers: OptimizersContainer,
        lr_schedulers: LRSchedulersContainer,
        states: dict[str, Any],
        sd_adapter: BaseStateDictAdapter | None,
        base_folder: str = "",
    ) -> None:
        self.enable = config.enable
        if not self.enable:
            return
        self.save_future: SaveHandle | None = None  # type: ignore[assignment]
        self.folder = filesystem.join(base_folder, config.folder)
        self.states = states
        self.states.update(
            {
                MODEL: ModelWrapper(model_parts),
                OPTIMIZER: optimizers,
                DATALOADER: dataloader,
                LR_SCHEDULER: lr_schedulers,
            }
        )
        for name in _POLICY:
            setattr(self, name, getattr(config, name))
        self.export_dtype = TORCH_DTYPE_MAP[config.export_dtype]
        self.sd_adapter = sd_adapter
        self.async_mode = config.async_mode
        self.preemption = config.preemption and not config.load_only
        store = {
            k: v
            for k, v in (
                ("endpoint", config.endpoint),
                ("region", config.region),
                ("transport", config.transport),
            )
            if v is not None
        }
        overlap = config.async_mode == "async_with_pinned_mem"
        self.checkpointer = Checkpointer(
            self.folder,
            keep_last=config.keep_latest_k or None,
            overlap=overlap,
            incremental=config.incremental,
            **store,
        )
        if overlap:  # the optimizers wait for the copy before changing the weights
            self.checkpointer.attach(optimizers)
        if self.preemption:
            self.checkpointer.install_sigterm_handler()
        logger.info("shardckpt: torchtitan checkpoints go to %s", self.checkpointer.root_uri)

    # -- saving ----------------------------------------------------------------------------
    @torch.no_grad()
    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        # Every rank calls save at every step, so the preemption vote can be taken here.
        preempted = self.preemption and self.checkpointer.preempted()
        if not (preempted or self._should_save(curr_step, last_step)):
            return False
        states = self._last_step_states() if last_step else self._flattened_model_states_sd()
        handle = self.checkpointer.save(curr_step, _plain(states))
        if last_step or preempted or self.async_mode == "disabled":
            self.checkpointer.wait()
        else:
            self.save_future = handle  # type: ignore[assignment]
        if preempted:
            logger.warning(
                "shardckpt: preempted (SIGTERM): step %d is committed; exiting with %d",
                curr_step,
                PREEMPTED_EXIT,
            )
            self.close()
            raise SystemExit(PREEMPTED_EXIT)
        return True

    def _last_step_states(self) -> dict[str, Any]:
        """The last step's state, by the stock manager's rule: the full training state, or
        with ``last_save_model_only`` the model alone, floats in ``export_dtype``."""
        if not self.last_save_model_only:
            return self._flattened_model_states_sd()
        return {
            k: v.to(self.export_dtype)
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v
            for k, v in self.states[MODEL].state_dict().items()
        }

    def _maybe_wait_for_staging(self) -> None:
        self.checkpointer.wait_snapshot()

    def _wait_for_saving(self) -> None:
        self.save_future = None
        self.checkpointer.wait()

    # -- loading ----------------------------------------------------------------------------
    @torch.no_grad()
    def _load(self, step: int = -1) -> bool:
        """Load ``step`` (-1: the newest committed); without any shardckpt checkpoint, the
        stock manager's rules (a stock checkpoint in a local folder, initial_load_path)."""
        if step == -1:
            latest = self.checkpointer.latest()
            if latest is None:
                return self._load_without_ours()
            step = latest
        states = self._states_to_load(step == 0)  # step 0: a model-only seed checkpoint
        plain = _plain(states)
        logger.info("shardckpt: loading step %d from %s", step, self.checkpointer.root_uri)
        self.checkpointer.load(plain, step)
        for key, value in states.items():
            if isinstance(value, Stateful):
                value.load_state_dict(plain[key])
        self.states[MODEL].load_state_dict(plain)  # the model's keys are flattened in
        return True

    def _load_without_ours(self) -> bool:
        if filesystem.is_remote(self.folder) and not self.initial_load_path:
            logger.info("shardckpt: no checkpoint under %s, a fresh start", self.folder)
            return False  # the stock scan of a remote folder would need an fsspec backend
        return self._stock_load(-1)

    # -- lifecycle --------------------------------------------------------------------------
    def _close(self) -> None:
        self.save_future = None
        self.checkpointer.close()  # commits the save in flight (raising its error)


def _plain(states: dict[str, Any]) -> dict[str, Any]:
    """``states`` with each ``Stateful`` replaced by its state dict, as DCP does itself: the
    snapshot copies values, and must not copy the objects that own them."""
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in states.items()}


__all__ = ["PREEMPTED_EXIT", "ShardckptCheckpointManager"]
