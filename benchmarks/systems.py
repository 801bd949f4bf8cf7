"""The systems compared, one small class each: ``save(state, uri)`` writes ``state`` to
``uri`` and ``load(state, uri)`` fills ``state``'s tensors from it. Both may return named
phase timings (seconds). ``prepare_save``/``cleanup`` run outside the timed region."""

from __future__ import annotations

import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from benchmarks.measure import blocked_and_done
from benchmarks.s3util import REGION, MiB, Target, byte_views, cut, read_into, split_uri

State = dict[str, torch.Tensor]
Phases = dict[str, float] | None


class System(ABC):
    """One way to checkpoint. ``name`` is short and unique; ``description`` says how."""

    name: str = ""
    description: str = ""
    uses_s3 = True

    def __init__(self, target: Target) -> None:
        self.target = target

    def prepare_save(self, state: State, uri: str) -> None:  # noqa: B027  (optional hook)
        """Untimed work before ``save`` (e.g. the raw limit's request bodies)."""

    @abstractmethod
    def save(self, state: State, uri: str) -> Phases: ...

    @abstractmethod
    def load(self, state: State, uri: str) -> Phases: ...

    def cleanup(self, uri: str) -> None:  # noqa: B027  (optional hook)
        """Untimed: drop this rank's local leftovers of ``uri`` (the harness deletes S3)."""


class Shardckpt(System):
    name = "shardckpt"
    description = (
        "dcp.save/load with shardckpt.ShardWriter/ShardReader (defaults: 64 MiB objects, 8 threads)"
    )

    def __init__(self, target: Target, unconditional_commit: bool = False) -> None:
        super().__init__(target)
        # rclone ignores If-None-Match: shardckpt refuses to commit there unless told to.
        self.unconditional_commit = unconditional_commit

    @property
    def options(self) -> dict[str, object]:
        """shardckpt's store options (the endpoint is the counting relay's in that pass)."""
        return {
            "endpoint": self.target.endpoint,
            "unsafe_unconditional_commit": self.unconditional_commit,
        }

    def save(self, state: State, uri: str) -> Phases:
        from shardckpt import ShardWriter

        dcp.save(state, storage_writer=ShardWriter(uri, **self.options))
        return None

    def load(self, state: State, uri: str) -> Phases:
        from shardckpt import ShardReader

        dcp.load(state, storage_reader=ShardReader(uri, **self.options))
        return None


class ShardckptCheckpointer(Shardckpt):
    """The training-loop API: one ``Checkpointer`` for the whole run (its staging buffers and
    cached plan are reused, as in training), one step per save."""

    name = "checkpointer"
    description = (
        "shardckpt.Checkpointer.save (phase 'blocked': until it returns after the snapshot; "
        "timed until committed) / Checkpointer.load"
    )

    def __init__(self, target: Target, unconditional_commit: bool = False) -> None:
        super().__init__(target, unconditional_commit)
        self._checkpointer = None
        self._step = -1

    def save(self, state: State, uri: str) -> Phases:
        from shardckpt import Checkpointer

        if self._checkpointer is None:  # every rank gets here together (the save barrier)
            root = uri.rsplit("/", 1)[0] + "/steps"
            self._checkpointer = Checkpointer(root, **self.options)
        self._step += 1
        checkpointer, step = self._checkpointer, self._step
        blocked, _ = blocked_and_done(lambda: checkpointer.save(step, state), lambda h: h.wait())
        return {"blocked": blocked}

    def load(self, state: State, uri: str) -> Phases:
        assert self._checkpointer is not None, "save first"
        self._checkpointer.load(state, step=self._step)
        return None

    def cleanup(self, uri: str) -> None:
        from shardckpt.format.catalog import step_name

        ckpt = self._checkpointer
        if ckpt is not None and ckpt.rank == 0:  # the step lives outside ``uri``: drop it here
            ckpt.store.delete([o.key for o in ckpt.store.list(step_name(self._step) + "/")])


class AsyncSave(Shardckpt):
    """``dcp.async_save`` with ``ShardWriter`` and one ``PinnedStager`` for the run."""

    name = "async_save"
    description = (
        "dcp.async_save(storage_writer=ShardWriter, async_stager=PinnedStager) (phase "
        "'blocked': until it returns; timed until the future completes) / ShardReader"
    )

    def __init__(self, target: Target, unconditional_commit: bool = False) -> None:
        super().__init__(target, unconditional_commit)
        self._stager = None

    def save(self, state: State, uri: str) -> Phases:
        from shardckpt import PinnedStager, ShardWriter

        stager = self._stager = self._stager or PinnedStager()
        options = self.options
        blocked, _ = blocked_and_done(
            lambda: dcp.async_save(
                state, storage_writer=ShardWriter(uri, **options), async_stager=stager
            ),
            lambda future: future.result(),
        )
        return {"blocked": blocked}


class TorchSave(System):
    """s3torchconnector's ``S3Checkpoint`` with ``torch.save``/``torch.load``: one object per
    rank, written and read as one stream (what a single-process script does)."""

    name = "s3checkpoint"
    description = "s3torchconnector S3Checkpoint + torch.save / torch.load, one object per rank"

    def _key(self, uri: str) -> str:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return f"{uri}/rank{rank}.pt"

    def _checkpoint(self):  # type: ignore[no-untyped-def]
        from s3torchconnector import S3Checkpoint, S3ClientConfig

        config = S3ClientConfig(force_path_style=True)
        return S3Checkpoint(REGION, endpoint=self.target.endpoint, s3client_config=config)

    def save(self, state: State, uri: str) -> Phases:
        with self._checkpoint().writer(self._key(uri)) as f:
            torch.save(state, f)
        return None

    def load(self, state: State, uri: str) -> Phases:
        with self._checkpoint().reader(self._key(uri)) as f:
            loaded = torch.load(f, weights_only=True)
        for key, tensor in state.items():
            tensor.copy_(loaded[key])
        return None


class Connector(System):
    """s3torchconnector's DCP writer/reader, pointed at the endpoint by swapping in an
    ``S3FileSystem`` whose client has it (the classes take no endpoint)."""

    def __init__(
        self, target: Target, thread_count: int = 1, reader: str = "dcp_optimized"
    ) -> None:
        super().__init__(target)
        self.thread_count = thread_count
        self.reader = reader
        self.name = f"s3tc-t{thread_count}"
        self.description = (
            f"s3torchconnector.dcp S3StorageWriter(thread_count={thread_count}) / "
            f"S3StorageReader(S3ReaderConstructor.{reader}()), other settings default"
        )

    def _fs(self, reader_constructor: object = None):  # type: ignore[no-untyped-def]
        from s3torchconnector import S3ClientConfig
        from s3torchconnector._s3client import S3Client
        from s3torchconnector.dcp import S3FileSystem

        config = S3ClientConfig(force_path_style=True)
        client = S3Client(REGION, endpoint=self.target.endpoint, s3client_config=config)
        return S3FileSystem(REGION, s3_client=client, reader_constructor=reader_constructor)

    def save(self, state: State, uri: str) -> Phases:
        from s3torchconnector.dcp import S3StorageWriter

        writer = S3StorageWriter(REGION, uri, thread_count=self.thread_count)
        writer.fs = self._fs()
        dcp.save(state, storage_writer=writer)
        return None

    def load(self, state: State, uri: str) -> Phases:
        from s3torchconnector.dcp import S3StorageReader
        from s3torchconnector.s3reader import S3ReaderConstructor

        constructor = getattr(S3ReaderConstructor, self.reader)()  # stateful: one per load
        reader = S3StorageReader(REGION, uri, reader_constructor=constructor)
        reader.fs = self._fs(constructor)
        dcp.load(state, storage_reader=reader)
        return None


class LocalThenSync(System):
    """DCP's ``FileSystemWriter`` to a local folder, then each rank uploads its files with a
    boto3 thread pool (one PUT per file); load downloads what the rank needs, then
    ``FileSystemReader``. ``thread_count=8`` gives 8 files per rank, so the upload is as
    parallel as shardckpt's; ``sync_files=False`` because S3 is the durable copy."""

    name = "local+sync"
    threads = 8

    description = (
        "FileSystemWriter(thread_count=8, sync_files=False) to local disk + boto3 8-thread upload, "
        "one PUT per file; load = 8-thread download + FileSystemReader"
    )

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self._client = target.client(self.threads)

    def _folder(self, uri: str, suffix: str = "") -> str:
        return os.path.join(self.target.scratch, split_uri(uri)[1].replace("/", "_") + suffix)

    def _parallel(self, fn: Callable[[str], None], names: list[str]) -> None:
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(fn, names))

    def save(self, state: State, uri: str) -> Phases:
        from torch.distributed.checkpoint import FileSystemWriter

        bucket, prefix = split_uri(uri)
        folder = self._folder(uri)
        started = time.perf_counter()
        dcp.save(
            state,
            storage_writer=FileSystemWriter(folder, thread_count=self.threads, sync_files=False),
        )
        written = time.perf_counter()
        rank = self.target.rank
        names = [n for n in os.listdir(folder) if n.startswith(f"__{rank}_")]
        if rank == 0:
            names.append(".metadata")

        def upload(name: str) -> None:
            with open(os.path.join(folder, name), "rb") as f:
                self._client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=f)

        self._parallel(upload, names)
        return {"local": written - started, "upload": time.perf_counter() - written}

    def load(self, state: State, uri: str) -> Phases:
        from torch.distributed.checkpoint import FileSystemReader

        bucket, prefix = split_uri(uri)
        folder = self._folder(uri, f"-load{self.target.rank}")
        os.makedirs(folder, exist_ok=True)
        started = time.perf_counter()

        def download(name: str) -> None:
            reply = self._client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")
            with open(os.path.join(folder, name), "wb") as f:
                shutil.copyfileobj(reply["Body"], f, 8 * MiB)

        download(".metadata")
        metadata = FileSystemReader(folder).read_metadata()
        names = sorted(
            {
                info.relative_path
                for index, info in metadata.storage_data.items()
                if index.fqn in state
            }
        )
        self._parallel(download, names)
        fetched = time.perf_counter()
        dcp.load(state, storage_reader=FileSystemReader(folder))
        return {"download": fetched - started, "local": time.perf_counter() - fetched}

    def cleanup(self, uri: str) -> None:
        shutil.rmtree(self._folder(uri, f"-load{self.target.rank}"), ignore_errors=True)
        if self.target.rank == 0:  # the save folder is shared by the ranks of this machine
            shutil.rmtree(self._folder(uri), ignore_errors=True)


def _s3fs_version() -> str:
    from importlib import metadata

    return f"s3fs {metadata.version('s3fs')}, botocore {metadata.version('botocore')}"


class FsspecDcp(System):
    """DCP's ``FsspecWriter`` / ``FsspecReader`` over s3fs: what ``dcp.save(checkpoint_id=
    "s3://...")`` picks, and torchtitan's remote checkpoint folders. ``thread_count=8`` (one
    file per thread and rank, as parallel as shardckpt); ``sync_files=False``, because on an
    fsspec stream DCP's fsync falls back to ``os.sync()`` of the whole machine, and closing
    the s3fs file is what makes it durable. Runs in :mod:`benchmarks.peer_env`."""

    name = "dcp-fsspec"
    threads = 8

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.description = (
            f"dcp.save/load with DCP's FsspecWriter(thread_count={self.threads}, "
            f"sync_files=False) / FsspecReader over s3fs ({_s3fs_version()})"
        )

    def save(self, state: State, uri: str) -> Phases:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer = FsspecWriter(
            uri, thread_count=self.threads, sync_files=False, endpoint_url=self.target.endpoint
        )
        dcp.save(state, storage_writer=writer)
        return None

    def load(self, state: State, uri: str) -> Phases:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        dcp.load(state, storage_reader=FsspecReader(uri, endpoint_url=self.target.endpoint))
        return None


class LightningFsspec(System):
    """Lightning's own checkpoint I/O on an ``s3://`` path (``TorchCheckpointIO``, what a
    ``Trainer`` without shardckpt uses): ``torch.save`` into memory, then fsspec's s3fs
    uploads it; ``torch.load`` from an s3fs file. One object per rank. s3fs is pointed at
    the endpoint through fsspec's config, the only way in (Lightning passes no options).
    Runs in :mod:`benchmarks.peer_env`."""

    name = "lightning-fsspec"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.description = (
            "Lightning TorchCheckpointIO.save_checkpoint / load_checkpoint on s3://, one "
            f"object per rank (torch.save to memory + fsspec pipe; {_s3fs_version()})"
        )

    def _io(self, uri: str):  # type: ignore[no-untyped-def]
        import fsspec.config
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        fsspec.config.conf["s3"] = {"endpoint_url": self.target.endpoint}
        return TorchCheckpointIO(), f"{uri}/rank{self.target.rank}.ckpt"

    def save(self, state: State, uri: str) -> Phases:
        io, path = self._io(uri)
        io.save_checkpoint(state, path)
        return None

    def load(self, state: State, uri: str) -> Phases:
        io, path = self._io(uri)
        loaded = io.load_checkpoint(path)
        for key, tensor in state.items():
            tensor.copy_(loaded[key])
        return None


class RawLimit(System):
    """The raw limit: the same bytes as objects of 64 MiB, PUT from ready-made request bodies
    (built untimed) and GET straight into the tensors, with boto3 and 8 threads."""

    name = "raw"
    object_size = 64 * MiB
    threads = 8
    description = (
        "boto3, 8 threads: PUT / GET of the same bytes as 64 MiB objects (bodies prebuilt)"
    )

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self._client = target.client(self.threads)
        self._bodies: list[bytes] = []

    def _keys(self, uri: str, count: int) -> list[str]:
        _, prefix = split_uri(uri)
        return [f"{prefix}/rank{self.target.rank}-{i:06d}" for i in range(count)]

    def prepare_save(self, state: State, uri: str) -> None:
        self._bodies = [b"".join(piece) for piece in cut(byte_views(state), self.object_size)]

    def save(self, state: State, uri: str) -> Phases:
        bucket, _ = split_uri(uri)
        keys = self._keys(uri, len(self._bodies))
        with ThreadPoolExecutor(self.threads) as pool:
            list(
                pool.map(
                    lambda i: self._client.put_object(
                        Bucket=bucket, Key=keys[i], Body=self._bodies[i]
                    ),
                    range(len(keys)),
                )
            )
        return None

    def load(self, state: State, uri: str) -> Phases:
        bucket, _ = split_uri(uri)
        pieces = cut(byte_views(state), self.object_size)
        keys = self._keys(uri, len(pieces))

        def get(i: int) -> None:
            read_into(self._client.get_object(Bucket=bucket, Key=keys[i])["Body"], pieces[i])

        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(get, range(len(keys))))
        return None

    def cleanup(self, uri: str) -> None:
        self._bodies = []


class Memcpy(System):
    """The snapshot limit: a plain (single-threaded) memcpy of the same bytes into
    preallocated, pre-faulted host memory, and back for "load". No S3."""

    name = "memcpy"
    description = (
        "single-threaded memcpy of the same bytes into / out of a preallocated, pre-faulted buffer"
    )
    uses_s3 = False

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self._flat: memoryview | None = None

    def prepare_save(self, state: State, uri: str) -> None:
        total = sum(t.numel() * t.element_size() for t in state.values())
        self._flat = memoryview(bytearray(total))  # zero-filled, so every page is faulted in

    def _pairs(self, state: State) -> list[tuple[memoryview, memoryview]]:
        assert self._flat is not None, "prepare_save must run first"
        pairs, offset = [], 0
        for view in byte_views(state):
            pairs.append((view, self._flat[offset : offset + len(view)]))
            offset += len(view)
        return pairs

    def save(self, state: State, uri: str) -> Phases:
        for data, slot in self._pairs(state):
            slot[:] = data
        return None

    def load(self, state: State, uri: str) -> Phases:
        for data, slot in self._pairs(state):
            data[:] = slot
        return None

    def cleanup(self, uri: str) -> None:
        self._flat = None


# What users pick today.
PEERS = ("s3tc-t1", "s3tc-t8", "s3checkpoint", "local+sync", "dcp-fsspec", "lightning-fsspec")
ALL = (
    "shardckpt",
    "checkpointer",
    "async_save",
    "s3tc-t1",
    "s3tc-t8",
    "s3checkpoint",
    "local+sync",
    "dcp-fsspec",
    "lightning-fsspec",
    "raw",
    "memcpy",
)


def build(
    names: list[str],
    target: Target,
    connector_reader: str = "dcp_optimized",
    server: str = "seaweedfs",
) -> list[System]:
    """The systems called ``names`` (see ``ALL``), in that order, for the local ``server``."""
    unconditional = server == "rclone"
    made: dict[str, Callable[[], System]] = {
        "shardckpt": lambda: Shardckpt(target, unconditional),
        "checkpointer": lambda: ShardckptCheckpointer(target, unconditional),
        "async_save": lambda: AsyncSave(target, unconditional),
        "s3checkpoint": lambda: TorchSave(target),
        "s3tc-t1": lambda: Connector(target, 1, connector_reader),
        "s3tc-t8": lambda: Connector(target, 8, connector_reader),
        "local+sync": lambda: LocalThenSync(target),
        "dcp-fsspec": lambda: FsspecDcp(target),
        "lightning-fsspec": lambda: LightningFsspec(target),
        "raw": lambda: RawLimit(target),
        "memcpy": lambda: Memcpy(target),
    }
    unknown = [n for n in names if n not in made]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {list(ALL)}")
    return [made[n]() for n in names]
