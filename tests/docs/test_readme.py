"""Every Python snippet of README.md runs as written, against a real S3 server (moto).

A snippet uses names a user's program already has (``model``, ``opt``, ``state_dict``,
``train_step``, Lightning's ``Trainer``): a short prelude defines them, and nothing else. The
bucket the snippets name is created on the test session's moto server, which the snippets
reach through ``AWS_ENDPOINT_URL`` as a user's program would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import boto3
import pytest

from shardckpt.engine.checkpointer import LoadStats, SaveStats
from shardckpt.testing.servers import LocalS3Server

pytestmark = pytest.mark.slow

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
BUCKET = "my-bucket"

PRELUDE = """
import functools
import torch
import lightning

torch.manual_seed(0)


class Model(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        return self(batch).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters())


model = Model()
opt = torch.optim.AdamW(model.parameters())
state_dict = {"model": model.state_dict(), "step": 7}
total_steps = 200


def train_step():
    opt.zero_grad()
    model(torch.randn(4, 4)).pow(2).mean().backward()
    opt.step()


Trainer = functools.partial(
    lightning.Trainer, max_steps=3, enable_progress_bar=False, enable_model_summary=False
)
"""


def snippets() -> list[tuple[int, str]]:
    with open(README) as f:
        text = f.read()
    return [
        (text[: m.start()].count("\n") + 1, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)
    ]


def test_the_readme_has_snippets() -> None:
    assert len(snippets()) >= 4


def _run(moto: LocalS3Server, tmp_path, line: int, code: str) -> str:  # type: ignore[no-untyped-def]
    """Run one snippet after the prelude, on an empty bucket as a user's first run would
    (snippets name fixed URIs); its stderr."""
    bucket = boto3.resource(
        "s3",
        endpoint_url=moto.endpoint,
        region_name="us-east-1",
        aws_access_key_id=moto.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=moto.env["AWS_SECRET_ACCESS_KEY"],
    ).Bucket(BUCKET)
    if bucket.creation_date is None:
        bucket.create()
    bucket.objects.all().delete()  # the test's own bucket on the test's own server
    script = tmp_path / "snippet.py"
    script.write_text(f"{PRELUDE}\n# --- README.md line {line} ---\n{code}")
    env = dict(os.environ, **moto.env, AWS_ENDPOINT_URL=moto.endpoint, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"README.md line {line}:\n{code}\n{done.stderr[-3000:]}"
    return done.stderr


@pytest.mark.parametrize("line, code", snippets(), ids=[f"line{n}" for n, _ in snippets()])
def test_readme_snippet_runs_as_written(
    moto: LocalS3Server, tmp_path, line: int, code: str
) -> None:  # type: ignore[no-untyped-def]
    _run(moto, tmp_path, line, code)


def _section(title: str) -> str:
    with open(README) as f:
        return f.read().split(f"\n## {title}\n")[1].split("\n## ")[0]


def _figures(stats: type) -> set[str]:
    """A stats dataclass's fields and GB/s properties: what its JSON log line holds."""
    return {f.name for f in dataclasses.fields(stats)} | {
        name for name in vars(stats) if name.endswith("gbps")
    }


def test_observability_names_every_figure_and_its_snippet_logs_them(
    moto: LocalS3Server, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    section = _section("Observability")
    for stats in (SaveStats, LoadStats):
        assert not {f for f in _figures(stats) if f"`{f}`" not in section}, stats.__name__
    [(line, code)] = [(n, c) for n, c in snippets() if 'getLogger("shardckpt")' in c]
    logged = {
        kind: json.loads(figures)
        for kind, figures in re.findall(
            r"shardckpt (save|load) (\{.*\})$", _run(moto, tmp_path, line, code), re.M
        )
    }
    assert set(logged["save"]) == _figures(SaveStats)
    assert set(logged["load"]) == _figures(LoadStats)
