"""A process that saves a large state to S3 and is meant to be interrupted (Ctrl-C) by a test.

``python -m tests.checkpointer.interrupted_save checkpointer|save|lightning URI MIB``: prints
``saving`` on stdout once the upload is under way, then waits for it (``Checkpointer.wait``
inside its ``with`` block, ``shardckpt.save``, or the Lightning plugin's ``teardown`` as at
the end of ``fit``, for a checkpoint at URI). The store's endpoint comes from the environment.
"""

from __future__ import annotations

import sys

import torch

import shardckpt


def main(mode: str, uri: str, mib: int) -> None:
    state = {"w": torch.ones(mib, 1 << 18)}  # MIB MiB of float32
    if mode == "checkpointer":
        with shardckpt.Checkpointer(uri) as ck:
            ck.save(7, state)
            print("saving", flush=True)
            ck.wait()
    elif mode == "lightning":
        from shardckpt.integrations.lightning import ShardckptCheckpointIO

        io = ShardckptCheckpointIO()
        io.save_checkpoint({"global_step": 7, "state_dict": state}, uri)
        print("saving", flush=True)
        io.teardown()
    else:
        print("saving", flush=True)
        shardckpt.save(state, uri)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
