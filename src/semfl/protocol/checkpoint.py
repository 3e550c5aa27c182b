"""Checkpoint I/O: a run's whole state written atomically after each round, read back on --resume."""
from __future__ import annotations

from pathlib import Path

import torch

from semfl.files import atomic_write


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda h: torch.save(state, h))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint holds tensors and plain containers only, so it is read with ``weights_only=True``:
    a checkpoint from elsewhere cannot run code when it is loaded."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise RuntimeError(f"checkpoint {path} is unreadable ({exc})") from None
