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
thread, at most one save in flight (the next save, load or remove waits for it), and a
background failure is raised by the next call, or by ``teardown`` at the end of ``fit``.

How a checkpoint is stored: every plain (strided) tensor goes through DCP as raw bytes,
named by its place in the checkpoint (``state_dict/layer.weight``); everything else (the
structure, loop and callback state, hyper-parameters, ...) is pickled once, on the calling
thread, with each tensor replaced by a reference. So the checkpoint comes back with the same
types (``OrderedDict`` with its ``_metadata``, int keys of optimizer state, tuples) and
tensors shared in several places stay shared, as with ``torch.save``.

Trust: by default the pickled part is loaded with ``torch.load(weights_only=True)``, which is
what Lightning 2.6 with torch >= 2.6 does for a local ``.ckpt`` (``weights_only=None`` means
torch's default, True); Lightning's own checkpoints (loops, callbacks, optimizer and
scheduler state, plain hyper-parameters) load that way. ``trainer.fit(..., weights_only=False)``
or ``ShardckptCheckpointIO(trusted=True)`` allows full unpickling, for checkpoints you trust
that hold other objects: anyone who can write to the bucket could otherwise run code here.

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

import copy
import io
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from shardckpt._util.quiet import single_process_dcp
from shardckpt.compat import load_all
from shardckpt.dcp.reader import ShardReader
from shardckpt.dcp.staging import HostStaging
from shardckpt.dcp.writer import ShardWriter, _split_options
from shardckpt.errors import (
    CheckpointError,
    InvalidURIError,
    ManifestError,
    SaveFailedError,
    describe_failures,
    first_cause,
    from_dcp,
)
from shardckpt.format.layout import Layout
from shardckpt.format.manifest import read_manifest
from shardckpt.retention.deletion import delete_replaced, keys_in_use, retire_checkpoints
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

_SKELETON = "skeleton"
_TENSORS = "tensors"


class _TensorRef(str):
    """Stands in the pickled structure where a tensor was: the tensor's name among the
    stored tensors. A plain ``str`` subclass, so ``weights_only`` loading can allow it."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_TensorRef, (str(self),))


@dataclass
class LightningSave:
    """One background save: ``uri``, seconds the caller was blocked (``blocked_s``), seconds
    until committed (``total_s``, None until then). ``done()`` / ``wait()`` as for a future;
    ``wait`` does not raise: failures surface on the plugin's next call."""

    uri: str
    blocked_s: float
    future: Future[None] | None = field(default=None, repr=False)
    total_s: float | None = None

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()


@dataclass(frozen=True)
class _Target:
    """One checkpoint: where its store is rooted (the checkpoint's parent), its layout in
    that store, and its URI."""

    root: Location
    layout: Layout
    uri: str


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
        self.writer_options, self.store_options = _split_options(
            {**options, "overwrite": overwrite}
        )
        self._stores: dict[str, ObjectStore] = {}
        self._staging: HostStaging | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._last: Future[None] | None = None  # the newest queued task; the queue is FIFO
        self._error: BaseException | None = None
        self._saving: set[str] = set()
        self._removing: set[str] = set()
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
        target = self._target(path)
        started = time.perf_counter()
        skeleton, tensors = _split(checkpoint)
        blob = _dumps(skeleton)
        if self._staging is None:
            self._staging = HostStaging(pin_memory=self.pin_memory)
        staged = self._staging.snapshot(tensors)
        state = {_SKELETON: blob, _TENSORS: staged}
        save = LightningSave(target.uri, time.perf_counter() - started)
        attributes = {
            "lightning": True,
            "global_step": checkpoint.get("global_step"),
            "epoch": checkpoint.get("epoch"),
        }
        save.future = self._submit(
            lambda: self._write(target, state, attributes, save, started), target.uri, self._saving
        )
        self.last_save = save
        logger.debug(
            "snapshot of %s took %.4fs; uploading in the background", target.uri, save.blocked_s
        )

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load the checkpoint at ``path`` into one dict (tensors on the CPU, or moved as
        ``map_location`` says: a device or string, a dict mapping ``"cpu"`` to a device, or
        a ``torch.load``-style function). Waits for saves in flight first."""
        self.wait()
        target = self._target(path)
        store = self._store(target.root)
        reader = ShardReader._for_checkpoint(
            store, target.layout, target.uri, num_threads=self.writer_options.num_threads
        )
        reader.manifest = read_manifest(store, target.layout)  # clear errors, before DCP's
        try:
            state = load_all(reader)
        except CheckpointException as exc:
            raise from_dcp(exc, f"load of {target.uri}", CheckpointError)  # noqa: B904 (has its cause)
        blob = state.get(_SKELETON)
        if not isinstance(blob, bytes):
            raise ManifestError(
                f"{target.uri} is a shardckpt checkpoint, but not one written by {type(self).__name__}"
            )
        trusted = self.trusted if weights_only is None else not weights_only
        skeleton = _loads(blob, trusted=trusted, uri=target.uri)
        device = _device_of(map_location)
        tensors = {
            k: v if device is None else v.to(device) for k, v in state.get(_TENSORS, {}).items()
        }
        return _join(skeleton, tensors, target.uri)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path``: manifest first, then data. Queued behind the
        save in flight, so the previous checkpoint goes only once the new one is committed
        (and not at all if that save failed)."""
        self._raise_error()
        target = self._target(path)
        self._submit(lambda: self._remove(target), target.uri, self._removing)

    def teardown(self) -> None:
        """Wait for the background work, free threads, buffers and clients; raise a
        background failure. Lightning calls this at the end of ``fit``; the plugin can be
        used again afterwards."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._staging is not None:
                self._staging.close()
                self._staging = None
            for store in self._stores.values():
                store.close()
            self._stores.clear()

    # -- queries for callbacks and users ------------------------------------------------------
    def wait(self) -> None:
        """Block until every queued save and removal has finished; raise the first failure."""
        last = self._last
        if last is not None:
            last.result()  # tasks record their errors instead of raising
        self._raise_error()

    def exists(self, path: Any) -> bool:
        """Whether a checkpoint is committed at ``path``, or will be by the save in flight."""
        target = self._target(path)
        if target.uri in self._saving:
            return True
        if target.uri in self._removing:
            return False
        return self._store(target.root).head(target.layout.manifest_key) is not None

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
        target = self._target(path)
        self._store(target.root).put(target.layout.prefix, [data])

    # -- the background queue -----------------------------------------------------------------
    def _submit(self, task: Callable[[], None], uri: str, pending: set[str]) -> Future[None]:
        """Queue ``task``; ``uri`` is in ``pending`` (saves or removals) until it is done."""
        pending.add(uri)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-lightning")

        def run() -> None:
            try:
                if self._error is None:  # after a failure nothing runs until it is raised
                    task()
            except BaseException as exc:  # noqa: BLE001 - kept and raised by the next call
                with self._lock:
                    if self._error is None:
                        self._error = exc
            finally:
                pending.discard(uri)

        self._last = self._executor.submit(run)
        return self._last

    def _raise_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _write(
        self,
        target: _Target,
        state: dict[str, Any],
        attributes: dict[str, Any],
        save: LightningSave,
        started: float,
    ) -> None:
        try:
            store = self._store(target.root)
            replaced = keys_in_use(store, target.layout)
            writer = ShardWriter._for_checkpoint(
                store, target.layout, target.uri, attributes, self.writer_options
            )
            with single_process_dcp():
                dcp.save(state, storage_writer=writer, planner=DefaultSavePlanner(), no_dist=True)
            assert writer.last_manifest is not None
            delete_replaced(store, target.layout, writer.last_manifest, replaced)
        except CheckpointException as exc:
            raise SaveFailedError(
                f"Lightning checkpoint save to {target.uri} failed: {describe_failures(exc)}"
            ) from first_cause(exc)
        except Exception as exc:
            raise SaveFailedError(
                f"Lightning checkpoint save to {target.uri} failed: {type(exc).__name__}: {exc}"
            ) from exc
        save.total_s = time.perf_counter() - started
        self.history.append(save)
        logger.info(
            "committed %s: blocked %.4fs, total %.3fs", target.uri, save.blocked_s, save.total_s
        )

    def _remove(self, target: _Target) -> None:
        try:
            retire_checkpoints(self._store(target.root), [target.layout])
        except Exception as exc:
            raise CheckpointError(
                f"could not remove the Lightning checkpoint {target.uri}: {type(exc).__name__}: {exc}"
            ) from exc
        logger.debug("removed %s", target.uri)

    # -- paths ------------------------------------------------------------------------------
    def _target(self, path: Any) -> _Target:
        location = _location(path)
        if location.scheme == "s3":
            parent, _, name = location.prefix.rpartition("/")
            if not name:
                raise InvalidURIError(
                    f"a checkpoint path needs a name below the bucket: {os.fspath(path)!r}"
                )
            root = Location("s3", parent, location.bucket)
        else:
            parent, name = os.path.split(location.prefix)
            root = Location("file", parent)
        return _Target(root, Layout(name), str(location))

    def _store(self, location: Location) -> ObjectStore:
        key = str(location)
        with self._lock:
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


# -- the checkpoint's two parts -------------------------------------------------------------
def _storable(value: torch.Tensor) -> bool:
    """Tensors stored as raw bytes; others (sparse, quantized, subclasses) are pickled."""
    return (
        type(value) in (torch.Tensor, torch.nn.Parameter)
        and value.layout == torch.strided
        and not value.is_quantized
        and not value.is_nested
        and value.device.type != "meta"
    )


def _split(checkpoint: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(the structure with tensors replaced by :class:`_TensorRef`, the tensors by name).
    A tensor found at several places is stored once."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}

    def walk(value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, torch.Tensor) and _storable(value):
            name = names.get(id(value))
            if name is None:
                name = base = "/".join(str(p) for p in path) or "tensor"
                n = 1
                while name in tensors:
                    name, n = f"{base}#{n}", n + 1
                names[id(value)], tensors[name] = name, value
            return _TensorRef(name)
        if isinstance(value, dict):
            out = copy.copy(value)  # keeps the type and attributes (OrderedDict._metadata)
            for k, v in value.items():
                out[k] = walk(v, (*path, k))
            return out
        if isinstance(value, list):
            return [walk(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            items = [walk(v, (*path, i)) for i, v in enumerate(value)]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        return value

    return walk(checkpoint, ()), tensors


def _join(skeleton: Any, tensors: dict[str, torch.Tensor], uri: str) -> Any:
    def walk(value: Any) -> Any:
        if isinstance(value, _TensorRef):
            try:
                return tensors[str(value)]
            except KeyError:
                raise ManifestError(
                    f"{uri} has no tensor {str(value)!r}, which its structure refers to"
                ) from None
        if isinstance(value, dict):
            for k, v in value.items():
                value[k] = walk(v)
            return value
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple):
            items = [walk(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        return value

    return walk(skeleton)


def _dumps(skeleton: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(skeleton, buffer)
    return buffer.getvalue()


def _loads(blob: bytes, *, trusted: bool, uri: str) -> Any:
    if trusted:
        return torch.load(io.BytesIO(blob), weights_only=False)
    try:
        with torch.serialization.safe_globals([_TensorRef]):
            return torch.load(io.BytesIO(blob), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ManifestError(
            f"{uri}: the checkpoint holds objects that need full unpickling, which can run code from "
            "the bucket; for a checkpoint you trust pass trainer.fit(..., weights_only=False) or "
            f"ShardckptCheckpointIO(trusted=True) ({str(exc).splitlines()[0][:200]})"
        ) from None


def _device_of(map_location: Any) -> torch.device | None:
    """The device tensors go to (they are read into CPU memory), or None to leave them."""
    if map_location is None:
        return None
    if isinstance(map_location, str | torch.device):
        return torch.device(map_location)
    if isinstance(map_location, dict):
        target = map_location.get("cpu")
        return None if target is None else torch.device(target)
    if callable(map_location):  # torch.load style: fn(storage, location) -> storage
        moved = map_location(torch.UntypedStorage(0), "cpu")
        return getattr(moved, "device", None)
    raise TypeError(f"unsupported map_location {map_location!r}")


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
