"""What a method is: a base-station loop plus user handlers, talking only through a transport.

Methods register themselves by name (``register_method``); ``semfl.methods`` imports every module
under it, so the registry is complete once that package is imported."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from semfl.config import Config, register_method_tables
from semfl.data import ImageDataset
from semfl.wireless.channel import preserved_rng
from semfl.wireless.link import Link
from semfl.models import ImageSpec
from semfl.objective import Objective
from semfl.protocol.transport import Transport, UsersOnlyTransport
from semfl.protocol.validation import ReplyCheck

_METHODS: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    _METHODS[cls.name] = cls
    register_method_tables(cls.name, cls.tables)  # what its runs' config.toml may hold
    return cls


def methods_registered() -> dict[str, type["Method"]]:
    """Name -> class of every method registered so far (``semfl.methods`` imports them all)."""
    return dict(_METHODS)


@dataclass
class RunContext:
    """Everything a method may use that is not the transport."""

    cfg: Config
    data: ImageDataset
    spec: ImageSpec
    parts: list  # per-user index arrays into data.train_*
    classifier: torch.nn.Module
    link: Link
    device: torch.device
    test_x: torch.Tensor  # evaluation subset, on the device
    test_y: torch.Tensor
    out_dir: Path | None = None
    log: Callable[[str], None] = print

    @property
    def user_sizes(self) -> list[int]:
        return [len(p) for p in self.parts]


class Method:
    """Subclasses set `name` and implement handlers(), run_round() and evaluate()."""

    name = "method"
    # train.precision values its training honours (split methods send features/gradients: fp32)
    precisions: tuple[str, ...] = ("fp32", "bf16")
    # the method config tables its code reads ([psfl], [foundation], ...): a run's config holds
    # these and the core tables only, and setting a field of any other method table is an error
    tables: tuple[str, ...] = ()

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Checks of the config that only this method needs (raise ConfigError naming the field)."""

    def __init__(self, run: RunContext, transport: Transport):
        self.run = run
        self.cfg = run.cfg
        self.transport = transport

    @classmethod
    def objective(cls, cfg: Config) -> "Objective | None":
        """The loss, optimiser and learning rate its shared model trains with (semfl.objective);
        None where the method does not state one."""
        return None

    @classmethod
    def model_name(cls, cfg: Config) -> str:
        """The model it trains, for reports (summary.json's ``model``): ``model.arch`` unless the method
        builds its models from its own table."""
        return cfg.model.arch

    def handlers(self) -> dict[str, Callable]:
        raise NotImplementedError

    def expected_reply(self, kind: str) -> dict[str, torch.Tensor] | None:
        """The tensors (names, shapes, dtypes) a user's reply to a ``kind`` request must hold, or None
        when they vary; the transport rejects replies that differ (protocol.validation)."""
        return None

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        """One communication round; returns round-level fields for the global metrics row."""
        raise NotImplementedError

    def evaluate(self, round_: int) -> list[dict[str, Any]]:
        """Metric rows (scope global / user) for the current models."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self, out_dir: Path) -> dict[str, Any]:
        """Artifacts after the last round (figures, sweeps); returns summary fields."""
        return {}

    @classmethod
    def trained_models(cls, run: RunContext, state: dict[str, Any],
                       user_state: Callable[[int, Sequence[str]], dict[str, Any] | None]) -> dict[str, Callable[[], Any]]:
        """The trained models a checkpoint holds, for ``semfl.load``: name -> a function building that
        model with its weights, on ``run.device``.

        Names: ``"global"`` (the federated model), ``"user:K"`` (user K's own model), ``"mentor:K"``,
        ``"pair:I-J"`` (a sender's encoder with a receiver's decoder). ``state`` is :meth:`state_dict`
        as the checkpoint holds it; ``user_state(k, keys)`` reads those entries of user k's persistent
        state from the checkpoint (None where it is not there). A model is a semantic model
        (``transmit_symbols`` / ``reconstruct`` / ``channel``) or a
        :class:`semfl.models.split.SplitClassifier` (``transmit_symbols`` / ``classify``). The
        default names none: a method lists its models by overriding this."""
        return {}


def users_half(method_cls: type[Method], run: RunContext) -> Method:
    """The instance whose handlers serve the users: built as a Flower node builds it, it never runs a
    round, so a handler cannot read what the base station's loop keeps (only its context and payload)."""
    return method_cls(dataclasses.replace(run, log=lambda message: None), UsersOnlyTransport())


def bind(method_cls: type[Method], run: RunContext, transport: Transport,
         on_user_done: Callable[[int], None] | None = None, log: Callable[[str], None] | None = None) -> Method:
    """The base station's half of a method, talking through ``transport``; the transport serves the
    users with the handlers of a second, users' half (:func:`users_half`), built from the same random
    state (so with the same initial weights), and checks replies against the tensors each request
    kind expects and the users' data sizes."""
    with preserved_rng(run.device):  # the base station's half draws exactly what it drew alone
        users = users_half(method_cls, run)
    method = method_cls(run, transport)
    transport.bind(users.handlers(), on_user_done, ReplyCheck(method.expected_reply, run.user_sizes), log)
    return method
