"""PyTorch Lightning integration: ``ShardckptCheckpointIO`` (a ``CheckpointIO`` plugin) and
``ShardckptModelCheckpoint`` (a ``ModelCheckpoint`` that needs no fsspec backend for s3://).

::

    io = ShardckptCheckpointIO(endpoint="http://127.0.0.1:9000")
    trainer = Trainer(
        plugins=[io],
        callbacks=[ShardckptModelCheckpoint(dirpath="s3://bucket/run", every_n_train_steps=500, save_last=True)],
        logger=False,  # or a logger writing to a local folder
    )
    trainer.fit(model)
    trainer.fit(model, ckpt_path=io.latest("s3://bucket/run"))  # resume from the newest committed checkpoint

A checkpoint path Lightning hands over (``s3://bucket/run/epoch=0-step=10.ckpt``, or a local
path) names one shardckpt checkpoint: a "directory" holding ``manifest.json`` and its data
objects, committed by the manifest, written last. ``save_checkpoint`` returns once the
checkpoint is copied into reused host buffers; upload and commit run on one background
thread, at most one save in flight (the next save or load waits for it, a removal is queued
behind it), and a background failure is raised by the next call, or by ``teardown`` at the
end of ``fit``.

The saving is the Checkpointer's engine (``shardckpt.engine``): the same background thread
with one save in flight, the same errors raised once (one ``SaveFailedError``), the same
Ctrl-C handling (the first lets the save finish, the second aborts it), the same commit, and
an overwrite keeps the replaced generation (``engine.saving``). How a checkpoint dict is
stored (tensors as raw bytes, the rest pickled once) is ``lightning_format``.

Trust: by default the pickled part is loaded with ``torch.load(weights_only=True)``, as
Lightning does for a local ``.ckpt`` (``weights_only=None`` means torch's default, True).
``trainer.fit(..., weights_only=False)`` or ``ShardckptCheckpointIO(trusted=True)`` allows
full unpickling, for checkpoints you trust that hold other objects.

Lightning and s3:// paths: Lightning's ``ModelCheckpoint`` asks fsspec about its directory
(existence, listing, the version counter), which for s3:// needs the ``s3fs`` package and
its own endpoint configuration. ``ShardckptModelCheckpoint`` answers those questions through
the plugin's store instead, so no fsspec backend is needed (a checkpoint exists when its
manifest does). Lightning's ``ckpt_path="last"`` resolves candidates through fsspec as files;
it works for local directories, and for s3:// ``ShardckptModelCheckpoint`` refuses it with a
clear error: pass ``ckpt_path=io.latest(dirpath)`` or an exact path. With
``Trainer(default_root_dir="s3://...")`` pass ``logger=False`` (or a logger with a local
``save_dir``) and a ``ShardckptModelCheckpoint``: Lightning's default logger and
``ModelCheckpoint`` would go through fsspec. Strategies that save one full checkpoint from
global rank 0 (single device, DDP) route it through this plugin; sharded strategies (FSDP,
DeepSpeed) write their own formats.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException

from shardckpt._util.abort import AbortSwitch
from shardckpt.compat import load_all
from shardckpt.dcp.reader import ShardReader
from shardckpt.dcp.staging import HostStaging
from shardckpt.dcp.writer import split_options
from shardckpt.engine.background import Job, SaveQueue
from shardckpt.engine.saving import write_checkpoint
from shardckpt.errors import CheckpointError, InvalidURIError, from_dcp
from shardckpt.format.layout import Layout
from shardckpt.format.manifest import read_manifest
from shardckpt.integrations.lightning_format import SKELETON, TENSORS, from_state, to_state
from shardckpt.retention.deletion import retire_checkpoints
from shardckpt.store import ObjectStore, open_store
from shardckpt.uri import Location, parse_uri

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "shardckpt.integrations.lightning needs PyTorch Lightning: pip install 'shardckpt[lightning]'"
    ) from exc

logger = logging.getLogger(__name__)


@dataclass
class LightningSave:
    """One background save: ``uri``, seconds the caller was blocked (``blocked_s``), seconds
    until committed (``total_s``, None until then). ``done()`` / ``wait()`` as for a future;
    ``wait`` does not raise: failures surface on the plugin's next call."""

    uri: str
    blocked_s: float
    job: Job | None = field(default=None, repr=False)
    total_s: float | None = None

    def done(self) -> bool:
        return self.job is None or self.job.done()

    def wait(self) -> None:
        if self.job is not None:
            self.job.future.exception()  # waits; the error is the plugin's to raise


class ShardckptCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that saves to S3 (or a local folder) with shardckpt.

    - ``trusted``: load the non-tensor part with full unpickling (default False: torch's
      ``weights_only`` loader, as Lightning does for local files); a ``weights_only``
      argument from Lightning (``trainer.fit(..., weights_only=...)``) takes precedence.
    - ``overwrite``: replace a checkpoint that already exists at the path (default True:
      Lightning rewrites ``last.ckpt`` and reuses names as ``torch.save`` would); the replaced
      checkpoint's data is kept for one more generation (a reader that read its manifest
      can finish) and deleted by the next overwrite of the same path.
    - ``pin_memory``: pin the host buffers (default: when CUDA is available).
    - Other options go to :class:`~shardckpt.dcp.writer.WriterOptions` (``object_size``,
      ``num_threads``, ``fanout``) and the store (``endpoint``, ``region``, ``profile``,
      ``transport``).
    """

    def __init__(
        self,
        *,
        trusted: bool = False,
        overwrite: bool = True,
        pin_memory: bool | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.trusted = trusted
        self.pin_memory = pin_memory
        self.writer_options, self.store_options = split_options({**options, "overwrite": overwrite})
        self._stores: dict[str, ObjectStore] = {}  # opened on the caller's thread only
        self._staging: HostStaging | None = None
        self._saves = SaveQueue("shardckpt-lightning")
        self.last_save: LightningSave | None = None
        self.history: list[LightningSave] = []

    # -- CheckpointIO protocol ----------------------------------------------------------------
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Snapshot ``checkpoint`` into host buffers and return; upload and commit follow in
        the background. Waits for the previous save first (at most one in flight) and raises
        its error, if it failed."""
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes no storage_options; configure it in its constructor"
            )
        self.wait()
        location = _location(path)
        store, layout = self._open(location)
        started = time.perf_counter()
        blob, tensors = to_state(checkpoint)
        if self._staging is None:
            self._staging = HostStaging(pin_memory=self.pin_memory)
        state = {SKELETON: blob, TENSORS: self._staging.snapshot(tensors)}
        save = LightningSave(str(location), time.perf_counter() - started)
        attributes = {
            "lightning": True,
            "global_step": checkpoint.get("global_step"),
            "epoch": checkpoint.get("epoch"),
        }
        write = functools.partial(self._write, store, layout, state, attributes, save, started)
        save.job = self._saves.submit(write, f"the save of {save.uri}", save.uri)
        self.last_save = save
        logger.debug(
            "snapshot of %s took %.4fs; uploading in the background", save.uri, save.blocked_s
        )

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load the checkpoint at ``path`` into one dict (tensors on the CPU, or moved as
        ``map_location`` says: a device or string, a dict mapping ``"cpu"`` to a device, or
        a ``torch.load``-style function). Waits for saves in flight first."""
        self.wait()
        location = _location(path)
        store, layout = self._open(location)
        uri = str(location)
        reader = ShardReader.for_checkpoint(
            store, layout, uri, num_threads=self.writer_options.num_threads
        )
        reader.manifest = read_manifest(store, layout)  # clear errors, before DCP's
        try:
            state = load_all(reader)
        except CheckpointException as exc:
            raise from_dcp(exc, f"load of {uri}", CheckpointError)  # noqa: B904 (has its cause)
        trusted = self.trusted if weights_only is None else not weights_only
        return from_state(state, trusted=trusted, map_location=map_location, uri=uri)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path``: manifest first, then data. Queued behind the
        save in flight, so the previous checkpoint goes only once the new one is committed
        (and not at all if that save failed)."""
        self._saves.raise_error()
        location = _location(path)
        store, layout = self._open(location)
        remove = functools.partial(self._remove, store, layout, str(location))
        self._saves.then(remove, f"the removal of {location}", str(location))

    def teardown(self) -> None:
        """Wait for the background work, free threads, buffers and clients; raise a
        background failure. Lightning calls this at the end of ``fit``; the plugin can be
        used again afterwards."""
        try:
            self.wait()
        finally:
            self._saves.close()
            if self._staging is not None:
                self._staging.close()
                self._staging = None
            for store in self._stores.values():
                store.close()
            self._stores.clear()

    # -- queries for callbacks and users ------------------------------------------------------
    def wait(self) -> None:
        """Block until every queued save and removal has finished; raise the first failure,
        once. Ctrl-C while waiting: the first lets the save finish, the second aborts it."""
        self._saves.wait()

    def exists(self, path: Any) -> bool:
        """Whether a checkpoint is committed at ``path``, or will be by the save in flight."""
        location = _location(path)
        job = self._saves.in_flight(str(location))
        if job is not None:
            return job.saves  # a save (True) or a removal (False) queued or running
        store, layout = self._open(location)
        return store.head(layout.manifest_key) is not None

    def checkpoints(self, dirpath: Any) -> list[str]:
        """The committed checkpoints directly under ``dirpath``, oldest commit first."""
        store = self._store(_location(dirpath))
        found = []
        for name in store.list_prefixes(""):
            info = store.head(Layout(name).manifest_key)
            if info is not None:
                found.append((info.mtime, name))
        return [_child(dirpath, name) for _, name in sorted(found)]

    def latest(self, dirpath: Any) -> str | None:
        """The most recently committed checkpoint under ``dirpath`` (for ``ckpt_path=``), or
        None. Waits for saves in flight first."""
        self.wait()
        found = self.checkpoints(dirpath)
        return found[-1] if found else None

    def put_file(self, path: Any, data: bytes) -> None:
        """Store ``data`` as the single object ``path`` (a side file, e.g. a YAML summary)."""
        store, layout = self._open(_location(path))
        store.put(layout.prefix, [data])

    # -- the background work ------------------------------------------------------------------
    def _write(
        self,
        store: ObjectStore,
        layout: Layout,
        state: dict[str, Any],
        attributes: dict[str, Any],
        save: LightningSave,
        started: float,
        switch: AbortSwitch,
    ) -> None:
        write_checkpoint(
            store,
            layout,
            state,
            what=f"Lightning checkpoint save to {save.uri}",
            options=self.writer_options,
            switch=switch,
            attributes=attributes,
        )
        save.total_s = time.perf_counter() - started
        self.history.append(save)
        logger.info(
            "committed %s: blocked %.4fs, total %.3fs", save.uri, save.blocked_s, save.total_s
        )

    def _remove(self, store: ObjectStore, layout: Layout, uri: str) -> None:
        try:
            retire_checkpoints(store, [layout])
        except Exception as exc:
            raise CheckpointError(
                f"could not remove the Lightning checkpoint {uri}: {type(exc).__name__}: {exc}"
            ) from exc
        logger.debug("removed %s", uri)

    # -- paths ------------------------------------------------------------------------------
    def _open(self, location: Location) -> tuple[ObjectStore, Layout]:
        """The store a checkpoint lives in (rooted at its parent) and its layout there."""
        parent, name = location.split()
        if not name:
            raise InvalidURIError(f"a checkpoint path needs a name below the bucket: {location}")
        return self._store(parent), Layout(name)

    def _store(self, location: Location) -> ObjectStore:
        key = str(location)
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = open_store(location, **self.store_options)
        return store


class ShardckptModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose directory may be ``s3://bucket/prefix`` without fsspec's
    ``s3fs``: existence checks, the "directory not empty" warning and side files go through
    the trainer's :class:`ShardckptCheckpointIO` (which must be in ``Trainer(plugins=...)``).
    Takes the same arguments as ``ModelCheckpoint``; ``save_last="link"`` needs a local
    directory, and ``ckpt_path="last"`` works only for a local one (see the module doc)."""

    def __init__(self, dirpath: Any | None = None, *args: Any, **kwargs: Any) -> None:
        # ModelCheckpoint would look up an fsspec filesystem for the directory right away.
        super().__init__(None, *args, **kwargs)
        if dirpath is not None:
            dirpath = os.fspath(dirpath)
            if _is_local_file_protocol(dirpath):
                dirpath = os.path.realpath(os.path.expanduser(dirpath))
        self.dirpath = dirpath
        self._io: ShardckptCheckpointIO | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        io_plugin = trainer.strategy.checkpoint_io
        if not isinstance(io_plugin, ShardckptCheckpointIO):
            raise TypeError(
                f"{type(self).__name__} needs Trainer(plugins=[ShardckptCheckpointIO(...)]); "
                f"the trainer's CheckpointIO is {type(io_plugin).__name__}"
            )
        self._io = io_plugin
        self.dirpath = trainer.strategy.broadcast(self._resolve_dirpath(trainer))
        local = _is_local_file_protocol(self.dirpath)
        if local:
            self._fs = get_filesystem(self.dirpath)
        if self.save_last == "link" and not local:
            raise ValueError(
                f"save_last='link' needs a local directory, got dirpath={self.dirpath!r}"
            )
        if (
            trainer.is_global_zero
            and stage == "fit"
            and self.save_top_k != 0
            and io_plugin.checkpoints(self.dirpath)
        ):
            rank_zero_warn(f"Checkpoint directory {self.dirpath} exists and is not empty.")

    def _resolve_dirpath(self, trainer: Any) -> str:
        """Where checkpoints go, as documented for ``ModelCheckpoint``: ``dirpath``, else the
        first logger's ``<save_dir>/<name>/<version>/checkpoints``, else
        ``<default_root_dir>/checkpoints``."""
        if self.dirpath is not None:
            return os.fspath(self.dirpath)
        if trainer.loggers:
            first = trainer.loggers[0]
            save_dir = first.save_dir if first.save_dir is not None else trainer.default_root_dir
            version = (
                first.version if isinstance(first.version, str) else f"version_{first.version}"
            )
            return os.path.join(save_dir, str(first.name), version, "checkpoints")
        return os.path.join(trainer.default_root_dir, "checkpoints")

    def file_exists(self, filepath: Any, trainer: Any) -> bool:
        assert self._io is not None, "setup() runs first"
        local_decision = self._io.exists(filepath) if trainer.is_global_zero else False
        return trainer.strategy.reduce_boolean_decision(local_decision, all=False)

    def _find_last_checkpoints(self, trainer: Any) -> set[str]:
        dirpath = self._resolve_dirpath(trainer)
        if _is_local_file_protocol(dirpath):
            return super()._find_last_checkpoints(trainer)
        raise CheckpointError(
            f'ckpt_path="last" cannot be resolved under {dirpath}: Lightning looks the candidates up through '
            "fsspec, as files; pass the exact path instead, e.g. ckpt_path=io.latest(dirpath) with your "
            "ShardckptCheckpointIO"
        )

    def to_yaml(self, filepath: Any | None = None) -> None:
        import yaml

        assert self._io is not None, "setup() runs first"
        if filepath is None:
            assert self.dirpath is not None
            filepath = f"{os.fspath(self.dirpath).rstrip('/')}/best_k_models.yaml"
        best_k = {k: v.item() for k, v in self.best_k_models.items()}
        self._io.put_file(filepath, yaml.dump(best_k).encode())


def _child(dirpath: Any, name: str) -> str:
    """The path of ``name`` under ``dirpath``, spelled as Lightning spells paths."""
    location = _location(dirpath)
    if location.scheme == "s3":
        return f"{str(location).rstrip('/')}/{name}"
    return os.path.join(location.prefix, name)


def _location(path: Any) -> Location:
    try:
        return parse_uri(os.fspath(path))
    except TypeError:
        raise InvalidURIError(f"not a checkpoint path: {path!r}") from None
