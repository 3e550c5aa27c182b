"""Typed run configuration: TOML files, ``--set a.b=c`` overrides, validation that names the field.

Every field has a default, so an empty file is a valid config, and a one-line meaning
(:func:`option`), which ``semfl config show`` prints. Method-specific tables (``[psfl]``,
``[stc]``, ...) are registered by the method modules with :func:`register_table`; a method
declares the tables it reads (``Method.tables``), and a config holds only those: setting a field
of another method's table is an error naming the methods it belongs to.
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


def option(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its default (or default ``factory``) and its one-line meaning ``doc``."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def field_doc(f: dataclasses.Field) -> str:
    """The meaning of a config field, as given to :func:`option`."""
    return f.metadata.get("doc", "")


SCALES = ("tiny", "cpu", "paper")
DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100")


@dataclass
class DataConfig:
    root: str | None = option(None, "data directory; unset = $SEMFL_DATA, then the Debian path for Fashion-MNIST, then ./data")
    download: bool = option(True, "try the official mirrors when files are missing (needs a network)")
    partition: Literal["iid", "dirichlet", "ways_shots"] = option("dirichlet", "how the training images are split over users: iid, dirichlet (label skew) or ways_shots (m-way q-shot)")
    dirichlet_alpha: float = option(0.9, "concentration of the Dirichlet label split (smaller = more skewed users)")
    ways: int = option(3, "m of m-way q-shot")
    shots: int = option(100, "q of m-way q-shot")
    ways_shots_sigma: int = option(1, "spread of ways_shots: each user holds ways +- sigma classes with shots +- sigma samples each")
    sizes: list[int] = option(factory=list, doc="per-user sample counts (PSFL Table I); empty = natural sizes")
    max_per_user: int = option(0, "cap on each user's samples (0 = no cap); keeps cpu-scale runs short")
    user_fraction: float = option(1.0, "keep this fraction of every user's samples (keeps relative sizes, e.g. Table I)")
    test_samples: int = option(2000, "test images used for evaluation (0 = the whole test set)")


@dataclass
class ModelConfig:
    arch: str = option("csc", "a registered semantic-model family: csc, jscc, gsc-m, gsc-l, gsc-h, vq-jscc (`semfl models` lists them)")
    semantic_dim: int = option(0, "width of the semantic features; 0 = the preset's value")
    symbols_per_token: int = option(0, "complex channel uses per token; 0 = the preset's value")


@dataclass
class ChannelConfig:
    kind: Literal["awgn", "rayleigh"] = option("awgn", "channel inside the semantic model: awgn or rayleigh (block fading)")
    equalize: bool = option(True, "Rayleigh only: receiver knows h and equalises")
    train_snr: Literal["link", "fixed"] = option("link", "train at the user's link SNR of the round, or at snr_db")
    snr_db: float = option(10.0, "channel SNR in dB of training when channel.train_snr = \"fixed\"")


@dataclass
class LinkConfig:
    snr_process: Literal["uniform", "fixed"] = option("uniform", "how each user's link SNR is drawn each round: uniform in [snr_min_db, snr_max_db], or fixed at their midpoint")
    snr_min_db: float = option(0.0, "lowest link SNR in dB (psi_min of PSFL eq 26)")
    snr_max_db: float = option(25.0, "highest link SNR in dB (psi_max of PSFL eq 26)")
    uplink_bandwidth_hz: float = option(1e6, "uplink bandwidth per user in Hz (rate of PSFL eq 12)")
    uplink_power_w: float = option(0.1, "user transmit power in W (energy of PSFL eq 14)")
    downlink_bandwidth_hz: float = option(1e6, "downlink bandwidth per user in Hz")
    downlink_power_w: float = option(1.0, "base-station transmit power in W")
    tau_req_s: float = option(0.0, "delay constraint (16); 0 = unconstrained")
    energy_budget_j: float = option(0.0, "E_rest of (17); 0 = unconstrained")
    p_max_w: float = option(0.1, "maximum user transmit power in W (PSFL constraint 18)")
    eta: float = option(1.0, "weight of energy in the objective (15)")


@dataclass
class TrainConfig:
    local_epochs: int = option(1, "local epochs each user trains per round")
    batch_size: int = option(32, "local mini-batch size")
    lr: float = option(0.01, "local learning rate")
    optimizer: Literal["sgd", "adam"] = option("sgd", "local optimiser: sgd or adam")
    momentum: float = option(0.9, "SGD momentum (0 = plain SGD)")
    weight_decay: float = option(0.0, "L2 weight decay of the local optimiser")
    grad_clip: float = option(0.0, "max global gradient norm per step (0 = no clipping)")
    task_weight: float = option(0.0, "weight of the frozen classifier's CE in the loss (0 = MSE only)")
    participation: float = option(1.0, "fraction of users sampled each round")
    vmap: Literal["off", "on", "auto"] = option("auto", "train users of one architecture together with torch.func.vmap (FedAvg): \"on\", \"off\", or \"auto\" = on for cuda, off on cpu (measured slower on 2 CPU cores; see BENCHMARKS.md)")
    vmap_users: int = option(32, "at most this many users per vmapped group (bounds activation memory)")
    precision: Literal["fp32", "bf16"] = option("fp32", "arithmetic of the federated local training: \"fp32\", or \"bf16\" = torch.autocast to bfloat16 (weights, optimiser state, channel, aggregation, evaluation stay fp32; so do the classifier, MAE and foundation pretraining); measured 1.4x on a CPU with AMX (BENCHMARKS.md)")


@dataclass
class EvalConfig:
    every: int = option(1, "evaluate every N rounds (and always after the last)")
    batch_size: int = option(500, "evaluation batch size")
    snr_db: float = option(10.0, "channel SNR of the global evaluation")
    grid_images: int = option(8, "test images in the reconstruction grid of the report")
    snr_sweep: list[float] = option(factory=lambda: [0.0, 5.0, 10.0, 15.0, 20.0, 25.0], doc="channel SNRs (dB) at which the final models are tested (snr_sweep.json)")
    sweep_channels: list[str] = option(factory=list, doc="the final SNR sweep again on these channel kinds (a model trained on channel.kind tested on others, e.g. AWGN-trained models under Rayleigh fading: FedSFR Fig 4); channel.equalize applies")
    user_samples: int = option(0, "FedAvg family: each user's locally trained model on this many test images in the evaluated rounds (per-client local accuracy, PSFL Figs 15-16; PSFL's own: psfl.user_eval_samples); 0 = off")
    digital_baseline: bool = option(False, "the separation baseline in the final SNR sweep at each model's own k/n: \"JPEG + LDPC + QAM, adapted\", \"... designed for digital_design_snr dB\", \"JPEG at capacity\" (docs/digital-baseline.md); off by default: it takes 1.9-2.2x a CSC's own sweep, 0.6-1.7x the mentors' (19 s for 2000 test images at 6 SNRs on one CPU thread, `semfl baseline bench`)")
    digital_codec: Literal["jpeg", "webp"] = option("jpeg", "source codec of the digital baseline")
    digital_design_snr: float | None = option(None, "design SNR (dB) of the baseline's fixed modulation and code rate; none = the middle of link.snr_min_db..link.snr_max_db")
    converge_metric: str = option("loss", "global metric of the convergence test (semfl.convergence)")
    converge_window: int = option(5, "the convergence test fits a line to this many last evaluated values")
    converge_tolerance: float = option(0.01, "converged when |slope| / mean |value| is at most this per round; the final metrics row and summary.json record the verdict")
    stop_when_converged: bool = option(False, "stop after the first evaluated round whose convergence test passes (rounds is then the most a run may take)")


@dataclass
class ClassifierConfig:
    depth: int = option(0, "ResNet depth (8, 18, 34, 50, 101); 0 = the scale's default")
    epochs: int = option(0, "training epochs of the classifier; 0 = the scale's default")
    lr: float = option(1e-3, "learning rate of the frozen ResNet classifier (trained once per dataset, cached)")
    batch_size: int = option(128, "batch size of the classifier's training")
    cache_dir: str | None = option(None, "where the classifier and foundation mentors are cached; default: <data root>/semfl-cache, else ~/.cache/semfl")


@dataclass
class EngineConfig:
    state_memory_mb: float = option(0.0, "cap on per-user persistent state (mentors, residuals, optimiser state) held in memory by the local transport; idle users' state beyond it is saved to a temporary folder in the run directory and read back when the user is next active. 0 = no cap")
    reply_timeout_s: float = option(0.0, "Flower transport: how long the base station waits for the users' replies to one request before it goes on with those that answered (the others are logged as missing); 0 = no limit")
    connect_timeout_s: float = option(120.0, "Flower transport: how long the base station waits at the start of a run for every user's node to connect")
    workers: int = option(1, "local transport: serve a request's users in this many forked worker processes, one torch thread each (1 = sequential in this process, 0 = one per CPU). CPU-only machines. Same metrics as 1 run with one torch thread (see BENCHMARKS.md)")


@dataclass
class LogConfig:
    """What a run records besides its run directory's files (experiment trackers are optional
    dependencies: ``pip install semfl[tracking]``)."""

    tensorboard: bool = option(False, "every metrics row as TensorBoard scalars under <run>/tensorboard")
    mlflow_uri: str = option("", "an MLflow tracking URI (file:/path, sqlite:///file.db, http://server); \"\" = off")
    mlflow_experiment: str = option("semfl", "MLflow experiment name")
    figures: bool = option(True, "draw figures/*.png and the report's plots at the end of the run; false keeps metrics, summary and report tables (for sweeps of many runs, and tests)")
    checkpoint_every: int = option(0, "also keep the checkpoint of every N-th round in checkpoint/round-<t>/ (semfl.load(round=t)); 0 = last only")


@dataclass
class Config:
    method: str = option("fedavg", "the federated method to run (see `semfl config show --method M` for its table)")
    dataset: str = option("fashion-mnist", "fashion-mnist, mnist, cifar10 or cifar100")
    users: int = option(5, "number of users")
    rounds: int = option(10, "communication rounds")
    seed: int = option(0, "seed of every random stream (same config + seed = same metrics)")
    scale: Literal["tiny", "cpu", "paper"] = option("cpu", "model sizes: tiny (seconds, tests), cpu (minutes on 2 cores), paper (the papers' sizes, for a GPU)")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = option(factory=LogConfig, doc="experiment tracking (TensorBoard, MLflow) and kept checkpoints")
    # the tables of the method being run (Method.tables), filled by from_dict: name -> dataclass instance
    methods: dict[str, Any] = field(default_factory=dict)

    def table(self, name: str) -> Any:
        """The options dataclass of a method table such as ``psfl`` (one the method declares it reads)."""
        if name not in self.methods:
            raise KeyError(f"[{name}] is not a table of method {self.method!r} (its tables: "
                           f"{', '.join(self.methods) or 'none'}); add it to the method's `tables`")
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


CORE_TABLES = ("data", "model", "channel", "link", "train", "eval", "classifier", "engine", "log")


# method name -> the method tables it reads (Method.tables), filled by the method registry
_METHOD_READS: dict[str, tuple[str, ...]] = {}


def register_method_tables(method: str, tables: tuple[str, ...]) -> None:
    """Declare which method tables ``method`` reads (the registry calls this for every method)."""
    _METHOD_READS[method] = tuple(tables)


def method_tables() -> dict[str, type]:
    """Every registered method table: name -> options dataclass."""
    discover()
    return dict(_METHOD_TABLES)


def tables_of(method: str) -> tuple[str, ...]:
    """The method tables that ``method`` reads (its ``Method.tables``)."""
    discover()
    if method not in _METHOD_READS:
        raise ConfigError(f"method: unknown method {method!r} (allowed: {', '.join(sorted(_METHOD_READS))})")
    return _METHOD_READS[method]


def table_readers(table: str) -> list[str]:
    """The methods that read the method table ``table``."""
    discover()
    readers = [m for m in sorted(_METHOD_READS) if table in _METHOD_READS[m]]
    return sorted(readers, key=lambda m: m != table)  # the method named after the table first


def drop_foreign_tables(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` without the method tables its method does not read (an old run's config.toml, or a
    sweep whose shared tables serve several methods)."""
    method = raw.get("method", Config.method)
    if not isinstance(method, str):
        return raw  # from_dict names the type error
    keep = tables_of(method)
    return {k: v for k, v in raw.items() if k not in method_tables() or k in keep}


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
    """Build and validate a Config from a nested dict (a parsed TOML file).

    The config gets the core tables and the tables its method reads; a method table that the
    method does not read is an error naming the field and the methods that read it."""
    registered = method_tables()
    raw = dict(raw)
    method_raw = {name: raw.pop(name) for name in list(raw) if name in registered}
    for name, value in method_raw.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table, got {value!r}")
    cfg = _build(Config, raw, "")
    own = tables_of(cfg.method)
    for name, value in method_raw.items():
        if name not in own and value:
            key = next(iter(value))
            readers = table_readers(name)
            if not readers:
                raise ConfigError(f"{name}.{key}: no method reads the table [{name}] (a method lists the "
                                  f"tables it reads in its `tables`)")
            raise ConfigError(f"{name}.{key}: belongs to method{'s' if len(readers) > 1 else ''} "
                              f"{', '.join(readers)}, not to {cfg.method!r} (the method being run); "
                              f"remove it or set method = {readers[0]!r}")
    for name in own:
        cfg.methods[name] = _build(registered[name], method_raw.get(name, {}), name + ".")
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
        if not all(parts):
            raise ConfigError(f"--set {item}: expected key=value, with a key like train.lr")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a table")
        node[parts[-1]] = _parse_value(text.strip())
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, foreign: str = "error") -> Config:
    """The config of a TOML file (None = all defaults) with ``--set`` overrides. ``foreign = "drop"``
    ignores method tables the method does not read (an old run directory's config.toml)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: no such file {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML ({exc})") from None
    raw = apply_overrides(raw, list(overrides or []))
    return from_dict(drop_foreign_tables(raw) if foreign == "drop" else raw)


def loads_config(text: str, overrides: list[str] | None = None) -> Config:
    """A config from TOML text (what the Flower transport sends to users' nodes)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: not valid TOML ({exc})") from None
    return from_dict(apply_overrides(raw, list(overrides or [])))


def _short_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_short_type(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_short_type(typing.get_args(tp)[0])}]"
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _literal(value: Any) -> str:
    return "(unset)" if value is None else tomli_w.dumps({"v": value})[4:].strip()


def field_rows(cfg: Config) -> list[dict[str, str]]:
    """One row per field of the core tables and of the method's tables: table, field, type, default,
    value (TOML literals) and its meaning (``semfl config show``)."""
    rows = []
    sections = [("", Config, cfg)] + [(name, type(getattr(cfg, name)), getattr(cfg, name)) for name in CORE_TABLES] \
        + [(name, type(options), options) for name, options in cfg.methods.items()]
    for table, cls, instance in sections:
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            if f.name == "methods" or dataclasses.is_dataclass(hints[f.name]):
                continue
            rows.append({"table": table, "field": f"{table}.{f.name}" if table else f.name,
                         "type": _short_type(hints[f.name]), "default": _literal(getattr(defaults, f.name)),
                         "value": _literal(getattr(instance, f.name)), "doc": field_doc(f)})
    return rows


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
