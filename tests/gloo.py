"""Run a function in W gloo processes on this machine and collect what each returns."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world_size: int, *args) -> list:
    """``fn(rank, world_size, *args)`` in each of ``world_size`` processes; returns their results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(Path(out_dir) / f"{rank}.pt") for rank in range(world_size)]
