"""Typed run configuration: TOML files, ``--set a.b=c`` overrides, validation that names the field.

Every field has a default, so an empty file is a valid config. Method-specific tables
(``[psfl]``, ``[stc]``, ...) are registered by the method modules with :func:`register_table`.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import tomli_w


class ConfigError(ValueError):
    """A config field is unknown, mistyped or impossible; the message starts with the field name."""


SCALES = ("tiny", "cpu", "paper")
DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100")


@dataclass
class DataConfig:
    root: str | None = None  # then $SEMFL_DATA, then the Debian path for Fashion-MNIST
    download: bool = True  # try the official mirrors when files are missing (needs a network)
    partition: Literal["iid", "dirichlet", "ways_shots"] = "dirichlet"
    dirichlet_alpha: float = 0.9
    ways: int = 3  # m of m-way q-shot
    shots: int = 100  # q of m-way q-shot
    ways_shots_sigma: int = 1
    sizes: list[int] = field(default_factory=list)  # per-user sample counts (PSFL Table I); empty = natural sizes
    max_per_user: int = 0  # cap on each user's samples (0 = no cap); keeps cpu-scale runs short
    user_fraction: float = 1.0  # keep this fraction of every user's samples (keeps relative sizes, e.g. Table I)
    test_samples: int = 2000  # test images used for evaluation (0 = the whole test set)


@dataclass
class ModelConfig:
    arch: str = "csc"  # a registered semantic-model family: csc, jscc, gsc-m, gsc-l, gsc-h
    semantic_dim: int = 0  # 0 = the preset's value
    symbols_per_token: int = 0  # complex channel uses per token; 0 = the preset's value


@dataclass
class ChannelConfig:
    kind: Literal["awgn", "rayleigh"] = "awgn"
    equalize: bool = True  # Rayleigh only: receiver knows h and equalises
    train_snr: Literal["link", "fixed"] = "link"  # train at the user's link SNR of the round, or at snr_db
    snr_db: float = 10.0


@dataclass
class LinkConfig:
    snr_process: Literal["uniform", "fixed"] = "uniform"
    snr_min_db: float = 0.0
    snr_max_db: float = 25.0
    uplink_bandwidth_hz: float = 1e6
    uplink_power_w: float = 0.1
    downlink_bandwidth_hz: float = 1e6
    downlink_power_w: float = 1.0
    tau_req_s: float = 0.0  # delay constraint (16); 0 = unconstrained
    energy_budget_j: float = 0.0  # E_rest of (17); 0 = unconstrained
    p_max_w: float = 0.1  # (18)
    eta: float = 1.0  # weight of energy in the objective (15)


@dataclass
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm per step (0 = no clipping)
    task_weight: float = 0.0  # weight of the frozen classifier's CE in the loss (0 = MSE only)
    participation: float = 1.0  # fraction of users sampled each round
    # train users of one architecture together with torch.func.vmap (FedAvg): "on", "off", or
    # "auto" = on for cuda, off on cpu (measured slower on 2 CPU cores; see BENCHMARKS.md)
    vmap: Literal["off", "on", "auto"] = "auto"
    vmap_users: int = 32  # at most this many users per vmapped group (bounds activation memory)
    # arithmetic of the federated local training: "fp32", or "bf16" = torch.autocast to bfloat16
    # (weights, optimiser state, channel, aggregation, evaluation stay fp32; so do the classifier,
    # MAE and foundation pretraining); measured 1.4x on a CPU with AMX (BENCHMARKS.md)
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class EvalConfig:
    every: int = 1  # evaluate every N rounds (and always after the last)
    batch_size: int = 500
    snr_db: float = 10.0  # channel SNR of the global evaluation
    grid_images: int = 8
    snr_sweep: list[float] = field(default_factory=lambda: [0.0, 5.0, 10.0, 15.0, 20.0, 25.0])
    # the final SNR sweep again on these channel kinds (a model trained on channel.kind tested on
    # others, e.g. AWGN-trained models under Rayleigh fading: FedSFR Fig 4); channel.equalize applies
    sweep_channels: list[str] = field(default_factory=list)
    # FedAvg family: each user's locally trained model on this many test images in the evaluated
    # rounds (per-client local accuracy, PSFL Figs 15-16; PSFL's own: psfl.user_eval_samples); 0 = off
    user_samples: int = 0
    # the separation baseline in the final SNR sweep, at each model's own k/n: "JPEG + LDPC + QAM,
    # adapted", "... designed for digital_design_snr dB", "JPEG at capacity" (docs/digital-baseline.md).
    # Off by default: its 5G LDPC decoding costs minutes on 2 CPU cores for 1000 test images
    # (docs/digital-baseline.md); the quickstart configs switch it on
    digital_baseline: bool = False
    digital_codec: Literal["jpeg", "webp"] = "jpeg"
    digital_design_snr: float | None = None  # None: the middle of link.snr_min_db..link.snr_max_db
    # convergence (semfl.convergence): the run has converged when the least-squares slope of the last
    # converge_window evaluated values of the global converge_metric, relative to their mean, is at
    # most converge_tolerance per round; the final metrics row and summary.json record the verdict
    converge_metric: str = "loss"
    converge_window: int = 5
    converge_tolerance: float = 0.01
    # stop after the first evaluated round whose convergence test passes; `rounds` is then the most
    # the run may take (a sweep counts such a run as done)
    stop_when_converged: bool = False


@dataclass
class ClassifierConfig:
    depth: int = 0  # ResNet depth (8, 18, 34, 50, 101); 0 = the scale's default
    epochs: int = 0  # 0 = the scale's default
    lr: float = 1e-3
    batch_size: int = 128
    cache_dir: str | None = None  # default: <data root>/semfl-cache, else ~/.cache/semfl


@dataclass
class EngineConfig:
    # cap on per-user persistent state (mentors, residuals, optimiser state) held in memory by the
    # local transport; idle users' state beyond it is saved to a temporary folder in the run
    # directory and read back when the user is next active. 0 = no cap
    state_memory_mb: float = 0.0
    # Flower transport: how long the base station waits for the users' replies to one request
    # before it goes on with those that answered (the others are logged as missing); 0 = no limit
    reply_timeout_s: float = 0.0
    # how long it waits at the start of a run for every user's node to connect
    connect_timeout_s: float = 120.0
    # local transport: serve a request's users in this many forked worker processes, one torch
    # thread each (1 = sequential in this process, 0 = one per CPU). CPU-only machines. Same
    # metrics as 1 run with one torch thread (see BENCHMARKS.md)
    workers: int = 1


@dataclass
class LogConfig:
    """What a run records besides its run directory's files (experiment trackers are optional
    dependencies: ``pip install semfl[tracking]``)."""

    tensorboard: bool = False  # every metrics row as TensorBoard scalars under <run>/tensorboard
    mlflow_uri: str = ""  # an MLflow tracking URI (file:/path, sqlite:///file.db, http://server); "" = off
    mlflow_experiment: str = "semfl"
    # also keep the checkpoint of every N-th round in checkpoint/round-<t>/ (semfl.load(round=t)); 0 = last only
    checkpoint_every: int = 0


@dataclass
class Config:
    method: str = "fedavg"
    dataset: str = "fashion-mnist"
    users: int = 5
    rounds: int = 10
    seed: int = 0
    scale: Literal["tiny", "cpu", "paper"] = "cpu"
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # method tables, filled from register_table(): name -> dataclass instance
    methods: dict[str, Any] = field(default_factory=dict)

    def table(self, name: str) -> Any:
        """The options dataclass of a method table such as ``psfl``."""
        return self.methods[name]

    def evaluates(self, round_: int) -> bool:
        """Whether round ``round_`` is evaluated: every eval.every rounds, and always the last."""
        return round_ % self.eval.every == 0 or round_ == self.rounds

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "methods"}
        for name, options in self.methods.items():
            out[name] = dataclasses.asdict(options)
        return _drop_none(out)


_METHOD_TABLES: dict[str, type] = {}


def register_table(name: str, options_cls: type) -> type:
    """Make ``[name]`` a valid config table backed by the dataclass ``options_cls``."""
    _METHOD_TABLES[name] = options_cls
    return options_cls


def _drop_none(value: Any) -> Any:
    # TOML has no null: a None field is simply left out and comes back as its default.
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "none"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "methods"]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a table, got {value!r}")
            kwargs[key] = _build(tp, value, where + ".")
        else:
            kwargs[key] = _coerce(value, tp, where)
    return cls(**kwargs)


# What registers tables and checks from above: importing it registers every method (and, through
# them, the model registry). Named, not imported, so this floor imports nothing of semfl above it.
PLUGINS = "semfl.methods"
_VALIDATORS: list[Callable[["Config"], None]] = []


def register_validator(check: Callable[["Config"], None]) -> None:
    """Add a check that needs a registry above this floor (method names, model architectures)."""
    if check not in _VALIDATORS:
        _VALIDATORS.append(check)


def discover() -> None:
    """Import the plugins so that their tables and validators are registered."""
    importlib.import_module(PLUGINS)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (a parsed TOML file)."""
    discover()
    raw = dict(raw)
    method_raw = {name: raw.pop(name) for name in list(raw) if name in _METHOD_TABLES}
    for name, value in method_raw.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table, got {value!r}")
    cfg = _build(Config, raw, "")
    for name, options_cls in _METHOD_TABLES.items():
        cfg.methods[name] = _build(options_cls, method_raw.get(name, {}), name + ".")
    validate(cfg)
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict; values are TOML literals or bare strings."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a table")
        node[parts[-1]] = _parse_value(text.strip())
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: no such file {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML ({exc})") from None
    return from_dict(apply_overrides(raw, list(overrides or [])))


def loads_config(text: str, overrides: list[str] | None = None) -> Config:
    """A config from TOML text (what the Flower transport sends to users' nodes)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: not valid TOML ({exc})") from None
    return from_dict(apply_overrides(raw, list(overrides or [])))


def dump_config(cfg: Config) -> str:
    return tomli_w.dumps(cfg.to_dict())


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# the float fields where infinity means something ("inf = noiseless"); NaN is never valid
INFINITE_OK = ("downlink_snr_db",)


def _check_finite(values: dict[str, Any], prefix: str = "") -> None:
    """Every float in the config (in lists too) is a number, and finite unless INFINITE_OK says
    otherwise: lr = inf passes "> 0" and a NaN SNR passes every comparison, then poison a whole run."""
    for key, value in values.items():
        path = prefix + key
        if isinstance(value, dict):
            _check_finite(value, path + ".")
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                _check(not math.isnan(item), f"{path}: must be a number, got nan")
                _check(key in INFINITE_OK, f"{path}: must be finite, got {item}")


def validate(cfg: Config) -> None:
    discover()
    _check_finite(cfg.to_dict())
    for check in _VALIDATORS:
        check(cfg)
    _check(cfg.dataset in DATASETS, f"dataset: unknown dataset {cfg.dataset!r} (allowed: {', '.join(DATASETS)})")
    _check(cfg.users >= 1, f"users: must be >= 1, got {cfg.users}")
    _check(cfg.rounds >= 1, f"rounds: must be >= 1, got {cfg.rounds}")
    _check(cfg.seed >= 0, f"seed: must be >= 0, got {cfg.seed}")
    _check(cfg.model.semantic_dim >= 0, "model.semantic_dim: must be >= 0")
    _check(cfg.model.symbols_per_token >= 0, "model.symbols_per_token: must be >= 0")
    d = cfg.data
    _check(d.dirichlet_alpha > 0, f"data.dirichlet_alpha: must be > 0, got {d.dirichlet_alpha}")
    _check(d.ways >= 1, f"data.ways: must be >= 1, got {d.ways}")
    _check(d.shots >= 1, f"data.shots: must be >= 1, got {d.shots}")
    _check(d.ways_shots_sigma >= 0, "data.ways_shots_sigma: must be >= 0")
    _check(not d.sizes or len(d.sizes) == cfg.users,
           f"data.sizes: needs one size per user ({cfg.users}), got {len(d.sizes)}")
    _check(all(s > 0 for s in d.sizes), "data.sizes: every size must be > 0")
    _check(d.max_per_user >= 0, "data.max_per_user: must be >= 0")
    _check(0 < d.user_fraction <= 1, f"data.user_fraction: must be in (0, 1], got {d.user_fraction}")
    _check(d.test_samples >= 0, "data.test_samples: must be >= 0")
    k = cfg.link
    _check(k.snr_min_db <= k.snr_max_db,
           f"link.snr_min_db: must be <= link.snr_max_db ({k.snr_min_db} > {k.snr_max_db})")
    for name in ("uplink_bandwidth_hz", "downlink_bandwidth_hz", "uplink_power_w", "downlink_power_w", "p_max_w"):
        _check(getattr(k, name) > 0, f"link.{name}: must be > 0, got {getattr(k, name)}")
    for name in ("tau_req_s", "energy_budget_j", "eta"):
        _check(getattr(k, name) >= 0, f"link.{name}: must be >= 0, got {getattr(k, name)}")
    t = cfg.train
    _check(t.local_epochs >= 1, f"train.local_epochs: must be >= 1, got {t.local_epochs}")
    _check(t.batch_size >= 1, f"train.batch_size: must be >= 1, got {t.batch_size}")
    _check(t.lr > 0, f"train.lr: must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    _check(0 <= t.momentum < 1, f"train.momentum: must be in [0, 1), got {t.momentum}")
    _check(t.task_weight >= 0, "train.task_weight: must be >= 0")
    _check(t.grad_clip >= 0, f"train.grad_clip: must be >= 0, got {t.grad_clip}")
    _check(0 < t.participation <= 1, f"train.participation: must be in (0, 1], got {t.participation}")
    _check(t.vmap_users >= 1, f"train.vmap_users: must be >= 1, got {t.vmap_users}")
    _check(t.vmap != "on" or t.optimizer == "sgd", "train.vmap: 'on' needs train.optimizer = 'sgd' (batched training implements SGD)")
    _check(t.vmap != "on" or t.precision == "fp32", "train.vmap: 'on' needs train.precision = 'fp32' (batched training is fp32)")
    e = cfg.eval
    _check(e.every >= 1, f"eval.every: must be >= 1, got {e.every}")
    _check(e.batch_size >= 1, "eval.batch_size: must be >= 1")
    _check(e.grid_images >= 0, "eval.grid_images: must be >= 0")
    _check(e.user_samples >= 0, f"eval.user_samples: must be >= 0, got {e.user_samples}")
    if e.digital_baseline and e.digital_codec == "webp":
        from PIL import features
        _check(features.check("webp"), "eval.digital_codec: this Pillow has no WebP; use 'jpeg'")
    _check(e.converge_window >= 2, f"eval.converge_window: must be >= 2 (a slope needs two points), got {e.converge_window}")
    _check(e.converge_tolerance > 0, f"eval.converge_tolerance: must be > 0, got {e.converge_tolerance}")
    kinds = typing.get_args(typing.get_type_hints(ChannelConfig)["kind"])
    for kind in e.sweep_channels:
        _check(kind in kinds, f"eval.sweep_channels: unknown channel {kind!r} (allowed: {', '.join(kinds)})")
    _check(cfg.engine.state_memory_mb >= 0, f"engine.state_memory_mb: must be >= 0, got {cfg.engine.state_memory_mb}")
    _check(cfg.engine.reply_timeout_s >= 0, f"engine.reply_timeout_s: must be >= 0, got {cfg.engine.reply_timeout_s}")
    _check(cfg.engine.workers >= 0, f"engine.workers: must be >= 0 (0 = one per CPU), got {cfg.engine.workers}")
    _check(cfg.engine.workers == 1 or cfg.device == "cpu",
           f"engine.workers = {cfg.engine.workers}: worker processes are forked, which CUDA does not survive; "
           f"use engine.workers = 1 with device = {cfg.device!r}")
    _check(cfg.engine.workers == 1 or cfg.train.vmap != "on",
           "engine.workers > 1 and train.vmap = 'on' exclude each other (vmap trains the users together in one process)")
    _check(cfg.engine.connect_timeout_s > 0, f"engine.connect_timeout_s: must be > 0, got {cfg.engine.connect_timeout_s}")
    _check(cfg.log.checkpoint_every >= 0, f"log.checkpoint_every: must be >= 0, got {cfg.log.checkpoint_every}")
    _check(not cfg.log.mlflow_experiment.strip() == "", "log.mlflow_experiment: must not be empty")
    c = cfg.classifier
    _check(c.depth in (0, 8, 18, 34, 50, 101), f"classifier.depth: must be one of 0, 8, 18, 34, 50, 101, got {c.depth}")
    _check(c.epochs >= 0, "classifier.epochs: must be >= 0")
    _check(c.batch_size >= 1, f"classifier.batch_size: must be >= 1, got {c.batch_size}")
    _check(c.lr > 0, f"classifier.lr: must be > 0, got {c.lr}")
    _check(cfg.device == "cpu" or cfg.device.startswith("cuda"), f"device: expected 'cpu' or 'cuda[:N]', got {cfg.device!r}")
    for name, options in cfg.methods.items():
        check = getattr(options, "validate", None)
        if check is not None:
            check(cfg)
