"""``shardckpt.compat``: every shim called for real against the installed torch; no module
outside it touches a torch internal; and the torch range ``pyproject.toml`` declares lets pip
keep a user's own torch."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan

import shardckpt
from shardckpt import ShardReader, compat
from tests.conftest import make_target
from tests.distributed import run_ranks

PACKAGE = pathlib.Path(shardckpt.__file__).parent
REPO = PACKAGE.parent


def test_flatten_state_dict_gives_dcp_keys() -> None:
    t = torch.ones(2)
    flat = compat.flatten_state_dict({"model": {"layer": {"w": t}}, "step": 3})
    assert flat == {"model.layer.w": t, "step": 3}


def test_narrow_to_chunk_is_a_view_of_the_chunk() -> None:
    t = torch.arange(24).reshape(4, 6)
    part = compat.narrow_to_chunk(t, (1, 2), (2, 3))
    assert torch.equal(part, t[1:3, 2:5])
    assert part.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    assert compat.narrow_to_chunk(t, (0, 0), (4, 6)) is t


def _tensor(chunks: list[tuple[list[int], list[int]]]) -> TensorStorageMetadata:
    return TensorStorageMetadata(
        TensorProperties(dtype=torch.float32),
        torch.Size([4, 4]),
        [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks],
    )


def test_chunk_errors_names_each_problem() -> None:
    good = _tensor([([0, 0], [2, 4]), ([2, 0], [2, 4])])
    overlapping = _tensor([([0, 0], [3, 4]), ([2, 0], [2, 4])])
    plans = [SavePlan([])] * 2
    assert compat.chunk_errors(plans, Metadata({"good": good})) == []
    errors = compat.chunk_errors(plans, Metadata({"good": good, "bad": overlapping}))
    assert errors and all("bad" in e for e in errors)


def test_chunk_errors_under_torch_2_11_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch 2.11's _validate_global_plan answers a bool (and only logs the problems)
    monkeypatch.setattr(compat, "_validate_global_plan", lambda plans, metadata: False)
    [error] = compat.chunk_errors([SavePlan([])], Metadata({"w": _tensor([])}))
    assert "w" in error
    monkeypatch.setattr(compat, "_validate_global_plan", lambda plans, metadata: True)
    assert compat.chunk_errors([SavePlan([])], Metadata({"w": _tensor([])})) == []


@pytest.mark.parametrize("name", ["local", "moto-boto3"])
def test_load_all_loads_every_key(name: str, request: pytest.FixtureRequest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = make_target(name, request, tmp_path)
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 7}
    uri = f"{target.uri}/ckpt"
    shardckpt.save(state, uri, **target.options)
    loaded = compat.load_all(ShardReader(uri, **target.options))
    assert loaded.keys() == {"model", "step"} and loaded["step"] == 7
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


def _rebuild_dtensor(rank: int, world_size: int) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    full = torch.arange(12.0).reshape(4, 3)
    value = distribute_tensor(full, init_device_mesh("cpu", (world_size,)), [Shard(0)])
    local = value.to_local().clone()
    rebuilt = compat.dtensor_like(value, local)
    assert rebuilt.to_local().data_ptr() == local.data_ptr()  # not copied, not moved
    assert (rebuilt.device_mesh, rebuilt.placements) == (value.device_mesh, value.placements)
    assert rebuilt.shape == full.shape and not rebuilt.requires_grad
    assert torch.equal(rebuilt.full_tensor(), full)


@pytest.mark.slow
def test_dtensor_like_wraps_the_local_tensor_in_place() -> None:
    run_ranks(_rebuild_dtensor, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pin_and_unpin_host_memory() -> None:
    memory = torch.empty(1 << 20, dtype=torch.uint8)
    assert compat.pin_host_memory(memory.data_ptr(), memory.numel()) == 0
    assert memory.is_pinned()
    compat.unpin_host_memory(memory.data_ptr())
    assert not memory.is_pinned()


# -- no torch internals outside compat.py ------------------------------------------------------

# Private attributes of torch objects whose type the syntax tree does not show (a DTensor's
# spec, the CUDA runtime binding's calls).
TORCH_INTERNALS = {"_spec", "_local_tensor", "cudaHostRegister", "cudaHostUnregister"}


def _private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))


def _torch_internals(source: str) -> list[str]:
    """``line: what`` for each private torch name imported, or reached through a torch module
    or a known torch internal attribute, in ``source``."""
    tree = ast.parse(source)
    torch_names: set[str] = set()  # names bound to torch modules by this source's imports
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    torch_names.add(alias.asname or "torch")
                    if _private(alias.name):
                        found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                torch_names.add(alias.asname or alias.name)
                if _private(f"{node.module}.{alias.name}"):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        root = node.value
        while isinstance(root, ast.Attribute | ast.Call):
            root = root.value if isinstance(root, ast.Attribute) else root.func
        via_torch = isinstance(root, ast.Name) and root.id in torch_names
        if node.attr in TORCH_INTERNALS or (via_torch and _private(node.attr)):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_outside_compat_touches_torch_internals() -> None:
    wrong = [
        f"{path.relative_to(REPO)}:{hit}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "compat.py"
        for hit in _torch_internals(path.read_text())
    ]
    assert not wrong, "\n".join(wrong)


def test_the_scan_catches_each_kind_of_internal() -> None:
    source = (
        "import torch\n"
        "import torch.distributed as dist\n"
        "import torch._dynamo\n"
        "from torch.distributed.checkpoint._nested_dict import flatten_state_dict\n"
        "from torch.distributed.checkpoint.default_planner import _validate_global_plan\n"
        "from torch.distributed.tensor import DTensor\n"
        "from torch.distributed.checkpoint import state_dict_loader as loader\n"
        "x = dist._functional_collectives\n"
        "loader._load_state_dict({}, storage_reader=None)\n"
        "DTensor(t, value._spec, requires_grad=False)\n"
        "torch.cuda.cudart().cudaHostRegister(0, 1, 0)\n"
        "self._store, torch.cuda.is_available()\n"
    )
    assert [hit.split(":")[0] for hit in _torch_internals(source)] == [
        "3", "4", "5", "8", "9", "10", "11",
    ]  # fmt: skip


# -- pip keeps a user's torch ------------------------------------------------------------------


def _stub_wheel(directory: pathlib.Path, name: str, version: str) -> None:
    """An empty wheel that installs as ``name`` ``version``: a stand-in for torch (and the
    other dependencies) that pip can resolve and install offline in a second."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def _setuptools_only(tmp_path: pathlib.Path) -> pathlib.Path:
    """A folder holding (links to) this environment's setuptools and nothing else: the build
    backend for the editable install, without this environment's torch."""
    folder = tmp_path / "setuptools"
    folder.mkdir()
    dist = importlib.metadata.distribution("setuptools")
    site = pathlib.Path(str(dist.locate_file("")))
    tops = {pathlib.PurePath(str(f)).parts[0] for f in dist.files or []}
    for top in tops - {"..", "bin"}:
        if (site / top).exists():
            (folder / top).symlink_to(site / top)
    return folder


@pytest.mark.slow
def test_pip_install_editable_keeps_a_supported_torch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`pip install -e .` into an environment with torch 2.12.0 keeps it, and replaces a torch
    older than the range (2.10.0): pip's own resolver, offline, on stub wheels."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, version in [("torch", "2.10.0"), ("torch", "2.12.0"), ("torch", "2.13.0")]:
        _stub_wheel(wheels, name, version)
    for dep in ("s3torchconnector", "numpy", "boto3", "crc32c", "xxhash", "tqdm"):
        _stub_wheel(wheels, dep, "99.0")
    project = tmp_path / "project"  # the metadata pip reads: pyproject.toml, as committed
    (project / "shardckpt").mkdir(parents=True)
    (project / "shardckpt" / "__init__.py").touch()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    [site] = venv.glob("lib/python*/site-packages")
    (site / "setuptools.pth").write_text(f"{_setuptools_only(tmp_path)}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no machine-wide index, find-links or constraints
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q"]
    offline = ["--no-index", "--find-links", str(wheels)]

    def installs_with_torch(version: str) -> dict[str, str]:
        subprocess.run([*pip, *offline, f"torch=={version}"], check=True, env=env)
        report = tmp_path / "report.json"
        subprocess.run(
            [*pip, *offline, "--no-build-isolation", "--dry-run", "--report", report]
            + ["-e", project],
            check=True,
            env=env,
        )
        chosen = json.loads(report.read_text())["install"]
        return {i["metadata"]["name"]: i["metadata"]["version"] for i in chosen}

    assert "torch" not in installs_with_torch("2.12.0")
    assert installs_with_torch("2.10.0")["torch"] == "2.13.0"
