"""The Python environment of the fsspec peers (s3fs), created on first use.

s3fs pins aiobotocore, which pins botocore to a narrow range that is older than the boto3 and
botocore shardckpt is developed with (checked with ``pip install --dry-run``: s3fs 2026.9.0
needs aiobotocore 3.10, which needs botocore < 1.43.118; this environment has 1.44.8, and the
only s3fs pip finds for it is 0.4.2, from 2020). Two botocores cannot share a process, and the
peers must run in the same rank processes as the other systems (alternating, on the same
bytes), so a run that includes an fsspec peer runs as a whole in a virtual environment that
holds s3fs, aiobotocore and the boto3/botocore they need, and sees every other package
(torch, lightning, s3torchconnector, ...) of this environment through a ``.pth`` file behind
its own. pip never replaces torch there (a constraint pins this environment's version) and
never touches this environment.
"""

from __future__ import annotations

import logging
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from importlib import metadata, util
from typing import NoReturn

logger = logging.getLogger(__name__)
SYSTEMS = ("dcp-fsspec", "lightning-fsspec")
# boto3: one that matches aiobotocore's botocore (pip resolves it with the rest; shardckpt's
# own S3 client in the same processes uses it too).
REQUIREMENTS = ("s3fs", "boto3")
# Where the environment lives (override with SHARDCKPT_BENCH_FSSPEC_VENV).
VENV = os.environ.get("SHARDCKPT_BENCH_FSSPEC_VENV") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
    "shardckpt",
    f"bench-fsspec-py{sys.version_info.major}{sys.version_info.minor}",
)


def needed(systems: Sequence[str]) -> bool:
    """Whether ``systems`` include an fsspec peer that this interpreter cannot run."""
    return any(s in SYSTEMS for s in systems) and util.find_spec("s3fs") is None


def _python() -> str:
    return os.path.join(VENV, "bin", "python")


def create() -> str:
    """The environment's Python, after creating the environment if it is not there yet."""
    python = _python()
    if os.path.exists(python):
        return python
    logger.info("creating the fsspec peers' environment (once): %s", VENV)
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    here = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(here, "_shardckpt_parent.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")  # searched after its own packages
    torch = metadata.version("torch").split("+")[0]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(f"torch=={torch}\n")
    try:
        pip = [python, "-m", "pip", "install", "--quiet", "-c", constraints.name, *REQUIREMENTS]
        subprocess.run(pip, check=True)
    except BaseException:
        shutil.rmtree(VENV, ignore_errors=True)  # half-made: the next run starts afresh
        raise
    finally:
        os.unlink(constraints.name)
    return python


def rerun_in_env(argv: Sequence[str], module: str = "benchmarks") -> NoReturn:
    """Run ``python -m module argv`` again in the environment, in place of this process.
    Its ``bin`` lacks the rclone and weed binaries, so this one's goes on PATH."""
    python = create()
    scripts = sysconfig.get_path("scripts")
    env = {**os.environ, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}
    logger.info("running in the fsspec peers' environment %s", VENV)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(python, [python, "-m", module, *argv], env)
