"""The `semfl` command line: run, config show, sweep, compare, report, models, data, pretrain, bench, deploy.

Building the parser imports nothing heavy (no torch, Sionna, Flower or the methods), so
`semfl --help` answers at once; each command imports what it needs when it runs. Every user
error (a bad config field, value, file or dataset) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from semfl.config import DATASETS, SCALES, ConfigError, load_config

# the parts of `semfl bench` (semfl.experiments.bench.bench.PARTS; a test keeps the two equal)
BENCH_PARTS = ("smoke", "overhead", "flower", "scaling", "scaling-psfl", "vmap", "precision", "workers", "psfl", "compute")
MENTOR_ARCHS = ("gsc-m", "gsc-l", "gsc-h")

EXAMPLES = """\
examples:
  semfl run configs/smoke.toml                     # a whole run in seconds -> runs/smoke-fedavg-s0/
  semfl run configs/quickstart.toml --set rounds=3 # PSFL, with a field overridden
  semfl run configs/quickstart.toml --dry-run      # check the config, print what would run
  semfl config show configs/quickstart.toml        # every field: type, default, value, meaning
  semfl sweep configs/psfl/sweep-study.toml --dry-run
  semfl models --scale paper                       # model presets with parameter counts
  semfl <command> --help                           # the options of one command
"""


def static_method_names() -> list[str]:
    """The names of the registered methods, read from the methods package's files without importing
    them (importing them loads torch and Sionna). tests/test_cli.py checks it against the registry."""
    package = Path(__file__).parent / "methods"
    pattern = re.compile(r'@register_method\s*\nclass \w+\([^)]*\):\s*\n(?:\s*"""[\s\S]*?"""\s*\n)?\s*name = "([^"]+)"')
    names = set()
    for path in package.rglob("*.py"):
        names.update(pattern.findall(path.read_text()))
    return sorted(names)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless it has none worth showing) and keeps the epilog's layout."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        if ("%(default)" in help_ or default in (None, False, [], "", argparse.SUPPRESS)
                or not action.option_strings):
            return help_
        return help_ + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other user error, with where to find the usage."""

    def error(self, message: str):
        self.exit(2, f"semfl: error: {message} (usage: {self.prog} --help)\n")


def _default_out(config: str | None, cfg) -> Path:
    stem = Path(config).stem if config else cfg.method
    return Path("runs") / f"{stem}-{cfg.method}-s{cfg.seed}"


# ---------------------------------------------------------------- commands

def cmd_run(args) -> int:
    if args.resume and args.config is None and args.out and (Path(args.out) / "config.toml").is_file():
        args.config = str(Path(args.out) / "config.toml")  # resuming: the run's own config, not the defaults
    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else _default_out(args.config, cfg)
    if args.dry_run:
        tables = "".join(f", [{name}]" for name in cfg.methods)
        print(f"would run: method {cfg.method} on {cfg.dataset}, {cfg.users} users, {cfg.rounds} rounds, "
              f"scale {cfg.scale}, seed {cfg.seed}, device {cfg.device}")
        print(f"run directory: {out}{' (resumed from its checkpoint)' if args.resume else ''}")
        print(f"config: the core tables{tables}; every field: semfl config show {args.config or ''}".rstrip())
        return 0
    from semfl.runtimes.run import Runner

    run_dir = Runner(cfg, out, resume=args.resume, show_progress=not args.quiet).execute()
    print(f"run directory: {run_dir}\nreport: {run_dir / 'report.html'}")
    return 0


def cmd_config_show(args) -> int:
    from semfl.config import field_rows

    sets = list(args.set) + ([f"method={args.method}"] if args.method else [])
    cfg = load_config(args.config, sets)
    rows = field_rows(cfg)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"method {cfg.method}: the core tables and [{'], ['.join(cfg.methods)}]" if cfg.methods
          else f"method {cfg.method}: the core tables (it reads no method table)")
    print("* = differs from the default\n")
    table = None
    # long values (lists) overflow their column rather than widen it for every row
    width = {k: min(24, max(len(r[k]) for r in rows)) for k in ("field", "type", "value")}
    width["field"] = max(len(r["field"]) for r in rows)
    for r in rows:
        if r["table"] != table:
            table = r["table"]
            print(f"[{table}]" if table else "[top level]")
        mark = "*" if r["value"] != r["default"] else " "
        print(f" {mark}{r['field']:<{width['field']}}  {r['type']:<{width['type']}}  "
              f"{r['value']:<{width['value']}}  (default {r['default']})  {r['doc']}")
    return 0


def cmd_models(args) -> int:
    from semfl.data.sources import canonical_name
    from semfl.models.catalogue import model_table

    rows = model_table(args.scale, canonical_name(args.dataset))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cells = [{**r, "parameters": f"{r['parameters']:,}"} for r in rows]
    heads = {"scale": "scale", "arch": "arch", "role": "role", "parameters": "parameters", "image": "image"}
    width = {k: max(len(str(c[k])) for c in [heads, *cells]) for k in heads}
    for c in [heads, *cells]:
        print(f"{c['scale']:<{width['scale']}}  {c['arch']:<{width['arch']}}  {c['role']:<{width['role']}}  "
              f"{c['parameters']:>{width['parameters']}}  {c['image']}")
    return 0


def cmd_data(args) -> int:
    from semfl import data as datamod

    try:
        ds = datamod.load_dataset(args.dataset, args.root, download=not args.no_download)
    except datamod.DataError as exc:
        # the data layer's hints name the config fields of `semfl run`; this command has flags for them
        raise datamod.DataError(str(exc).replace("`--set data.root=DIR`", "`--root DIR`")
                                .replace("`--set data.download=true`", "leave out --no-download")) from None
    root = datamod.resolve_root(ds.name, args.root)
    print(f"{ds.name}: {len(ds.train_y)} train / {len(ds.test_y)} test images, shape {tuple(ds.train_x.shape[1:])}, "
          f"{ds.num_classes} classes, from {root}")
    return 0


def cmd_report(args) -> int:
    from semfl.report import write_run_report
    from semfl.runtimes.run import RunError

    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        raise RunError(f"report: {args.run_dir} is not a run directory (it has no metrics.jsonl)")
    path = write_run_report(Path(args.run_dir))
    print(f"report: {path}")
    return 0


def cmd_pretrain(args) -> int:
    """MAE-pretrain one user's mentor on that user's own data; save it in MAE's checkpoint layout."""
    import math

    if args.epochs < 1:
        raise ConfigError(f"--epochs: must be at least 1 (the checkpoint is of a pretrained mentor), got {args.epochs}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr: must be a finite number > 0, got {args.lr}")
    cfg = load_config(args.config, args.set)
    if "psfl" not in cfg.methods:
        raise ConfigError(f"method: pretrain trains a PSFL mentor and needs a psfl config (e.g. configs/quickstart.toml, "
                          f"or --set method=psfl), got method {cfg.method!r}")
    import torch

    from semfl.wireless.channel import make_channel
    from semfl.methods.psfl.psfl import choose_mentors
    from semfl.models import build_model
    from semfl.models.gsc import pretrain_mae
    from semfl import rng
    from semfl.protocol import seeding
    from semfl.files import atomic_write
    from semfl.runtimes.run import prepare_data

    dataset, parts, _ = prepare_data(cfg)
    if not 0 <= args.user < cfg.users:
        raise ConfigError(f"--user: must be in [0, {cfg.users - 1}], got {args.user}")
    arch = args.arch or choose_mentors([len(p) for p in parts], cfg.table("psfl"), cfg.data.user_fraction)[args.user]
    stem = Path(args.config).stem if args.config else "defaults"
    out = Path(args.out) if args.out else Path("runs") / "mentors" / f"{stem}-user{args.user}-{arch}.pth"
    rng.manual_seed(seeding.derive_seed(cfg.seed, "mentor", args.user))
    model = build_model(arch, cfg.scale, dataset.spec, make_channel(cfg.channel))
    images = dataset.train_x[torch.from_numpy(parts[args.user])]
    losses = pretrain_mae(model, images, args.epochs, cfg.train.batch_size, args.lr,
                          seed=seeding.derive_seed(cfg.seed, "pretrain", args.user),
                          progress=lambda epoch, loss: print(f"epoch {epoch}: masked-patch loss {loss:.5f}"))
    atomic_write(out, lambda h: torch.save({"model": model.state_dict(), "arch": arch, "losses": losses}, h))
    print(f"{arch} of user {args.user} ({len(images)} images) pretrained; saved to {out}\n"
          f"use it: semfl run {args.config or ''} --set psfl.mentor_checkpoint={out}".replace("  ", " "))
    return 0


def cmd_sweep(args) -> int:
    from semfl.experiments.sweep import cmd_sweep as run

    return run(args)


def cmd_compare(args) -> int:
    from semfl.experiments.compare import cmd_compare as run

    return run(args)


def cmd_verify(args) -> int:
    from semfl.experiments.verify import cmd_verify as run  # scipy, torch and the sweep machinery load here

    return run(args)


def cmd_bench(args) -> int:
    from semfl.experiments.bench.bench import cmd_bench as run

    return run(args)


def cmd_deploy_local(args) -> int:
    from semfl.runtimes.flower.deploy import cmd_deploy_local as run

    return run(args)


# ---------------------------------------------------------------- parser

def _add_set(p: argparse.ArgumentParser, help_: str = "override a config field, e.g. train.lr=0.05 "
                                                      "(repeatable; lists in brackets: data.sizes=[100,200])") -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_)


def build_parser() -> argparse.ArgumentParser:
    methods = ", ".join(static_method_names())
    parser = _Parser(
        prog="semfl", formatter_class=_HelpFormatter, epilog=EXAMPLES,
        description="Federated learning of semantic-communication models over simulated wireless links "
                    f"(methods: {methods}).")
    parser.add_argument("--version", action="version", version=f"semfl {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".",
                              formatter_class=_HelpFormatter, **kw)

    run = command("run", "run one experiment from a TOML config into a run directory")
    run.add_argument("config", nargs="?", help="TOML config, e.g. configs/smoke.toml (omit for all defaults; "
                                                "with --resume, for the run's own config.toml)")
    _add_set(run)
    run.add_argument("--out", help="run directory (default: runs/<config>-<method>-s<seed>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--dry-run", action="store_true",
                     help="resolve and validate the config, print what would run, train nothing")
    run.set_defaults(func=cmd_run)

    config = command("config", "inspect configs")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_sub.add_parser(
        "show", formatter_class=_HelpFormatter,
        help="every field of the core tables and of the method's tables: type, default, value, meaning",
        description="Print every field of the core tables and of the tables the method reads, with its type, "
                    "default, current value (* = changed) and meaning.")
    show.add_argument("config", nargs="?", help="TOML config (omit for all defaults)")
    _add_set(show)
    show.add_argument("--method", help=f"show the config for this method (one of: {methods})")
    show.add_argument("--json", action="store_true", help="print the rows as JSON")
    show.set_defaults(func=cmd_config_show)

    sweep = command("sweep", "run a grid of configs (methods x variants x axes x seeds) and compare them")
    sweep.add_argument("config", help="sweep TOML: a config (or base = \"file.toml\") plus a [sweep] table of axes")
    _add_set(sweep, "override a field of every point (sweep.KEY=VALUE changes the [sweep] table)")
    sweep.add_argument("--out", help="sweep folder (default: runs/sweeps/<sweep name>)")
    sweep.add_argument("--dry-run", action="store_true", help="list the points and their state; run nothing")
    sweep.add_argument("--quiet", action="store_true", help="no per-run progress bars")
    sweep.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="run N points at once, each in its own process with cores/N threads")
    sweep.add_argument("--no-compare", action="store_true", help="skip the comparison report at the end")
    sweep.set_defaults(func=cmd_sweep)

    compare = command("compare", "compare run directories (or folders of runs): figures, summary, report.html")
    compare.add_argument("dirs", nargs="+", help="run directories, or folders holding run directories (a sweep folder)")
    compare.add_argument("--out", help="where to write figures/, summary.json/.md and report.html "
                                       "(default: the folder when one folder of runs is given, else runs/compare)")
    compare.add_argument("--title", help="report title (default: from the folder names)")
    compare.add_argument("--claims", metavar="FILE", help="a claims file (configs/claims/*.toml): adds each claim's "
                                                          "paired difference over seeds, 95 %% interval and verdict")
    compare.set_defaults(func=cmd_compare)

    verify = command("verify", "check a paper's claims (configs/claims/PAPER.toml): paired differences over seeds "
                               "with 95-per-cent intervals and verdicts")
    verify.add_argument("paper", help="psfl, fedcl, fedsfr, finefed (configs/claims/<paper>.toml) or a claims file")
    verify.add_argument("--runs", help="folder of the claims' sweeps (default: runs/verify/<paper>)")
    verify.add_argument("--seeds", type=int, nargs="+", help="seeds to use (default: the claims file's reporting seeds)")
    _add_set(verify, "override every run of the claims (sweep.KEY=VALUE edits the sweep grids)")
    verify.add_argument("--claims", nargs="+", metavar="ID", help="only these claims")
    verify.add_argument("--run-missing", action="store_true", help="run (or resume) the runs that have not finished")
    verify.add_argument("--jobs", type=int, default=1, metavar="N", help="with --run-missing: N runs at once")
    verify.add_argument("--out", help="verdict table file (default: <runs>/verdicts.md, with a .json copy beside it)")
    verify.set_defaults(func=cmd_verify)

    report = command("report", "rebuild a run directory's figures and report.html")
    report.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    report.set_defaults(func=cmd_report)

    models = command("models", "list model presets with parameter counts (counted on the meta device)")
    models.add_argument("--scale", choices=[*SCALES, "all"], default="all", help="preset scale")
    models.add_argument("--dataset", default="fashion-mnist",
                        help=f"image shape to count for: {', '.join(DATASETS)} (aliases such as fmnist work)")
    models.add_argument("--json", action="store_true", help="print the rows as JSON")
    models.set_defaults(func=cmd_models)

    data = command("data", "check that a dataset loads (downloads it when allowed)")
    data.add_argument("dataset", help=f"{', '.join(DATASETS)} (aliases such as fmnist work)")
    data.add_argument("--root", help="data directory (default: $SEMFL_DATA, then Debian's path, then ./data)")
    data.add_argument("--no-download", action="store_true", help="never download missing files")
    data.set_defaults(func=cmd_data)

    pretrain = command("pretrain", "MAE-pretrain a user's PSFL mentor on its own data (use it with "
                                   "--set psfl.mentor_checkpoint=FILE)")
    pretrain.add_argument("config", nargs="?", help="PSFL TOML config, e.g. configs/quickstart.toml (omit for defaults)")
    pretrain.add_argument("--user", type=int, default=0, help="whose data and mentor")
    pretrain.add_argument("--arch", choices=MENTOR_ARCHS, help="mentor architecture (default: the user's mentor "
                                                               "by the config's psfl.mentor_rule)")
    pretrain.add_argument("--epochs", type=int, default=5, help="MAE epochs")
    pretrain.add_argument("--lr", type=float, default=1.5e-4 * 4, help="AdamW learning rate")
    pretrain.add_argument("--out", help="checkpoint file, MAE layout {'model': state_dict} "
                                        "(default: runs/mentors/<config>-user<U>-<arch>.pth)")
    _add_set(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)

    bench = command("bench", "engine overhead, Flower comparison, scaling; JSON + Markdown results")
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--quick", action="store_true",
                       help="tiny models and few users: a check of the machinery (minutes on 2 cores), not numbers")
    bench.add_argument("--out", default="benchmarks/results", help="folder for bench-<device>.json/.md")
    bench.add_argument("--only", default="", help=f"comma-separated parts: {','.join(BENCH_PARTS)} "
                                                  "(merged into an existing result file of the same device)")
    bench.add_argument("--repeats", type=int, default=3, help="repeats of each timed loop (median reported)")
    _add_set(bench, "config override applied to every benchmark workload (e.g. data.root=DIR)")
    bench.set_defaults(func=cmd_bench)

    deploy = command("deploy", "run a config on a real Flower deployment (needs the [flower] extra)")
    where = deploy.add_subparsers(dest="where", required=True, metavar="WHERE")
    local = where.add_parser("local", formatter_class=_HelpFormatter,
                             help="a SuperLink and one SuperNode per user as processes on 127.0.0.1")
    local.add_argument("config", help="TOML config, e.g. configs/flower/quickstart.toml")
    local.add_argument("--users", type=int, required=True, help="number of SuperNodes (= users)")
    _add_set(local)
    local.add_argument("--out", help="run directory (default: runs/<config>-<method>-s<seed>-flower)")
    local.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    local.add_argument("--tls", action="store_true", help="TLS between SuperNodes/CLI and the SuperLink")
    local.add_argument("--auth", action="store_true", help="SuperNode authentication (EC key per node)")
    local.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    local.set_defaults(func=cmd_deploy_local)

    # commands that register their own parsers (light modules: torch loads inside the commands)
    from semfl.experiments import digital_baseline, transmit

    transmit.register(sub)  # transmit, export
    digital_baseline.register(sub)  # baseline digital | bench
    _use_formatter(sub)
    return parser


def _use_formatter(sub) -> None:
    """Every subcommand's help shows its defaults, those registered elsewhere too."""
    for parser in sub.choices.values():
        parser.formatter_class = _HelpFormatter
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _use_formatter(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("semfl")
    except PackageNotFoundError:
        from semfl import __version__

        return __version__


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix. Those of semfl's heavy modules count only when the module
    was imported (it cannot have raised otherwise), so this imports nothing."""
    found: list[type[BaseException]] = [ValueError, FileNotFoundError, FileExistsError, IsADirectoryError,
                                        NotADirectoryError, PermissionError]
    for module, name in (("semfl.data.sources", "DataError"), ("semfl.runtimes.run", "RunError"),
                         ("semfl.files", "FolderBusy"), ("semfl.protocol.checkpoint", "CheckpointError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


EXTRAS = {"flwr": "flower", "ray": "flower", "dp_accounting": "privacy"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("semfl: interrupted; resume with --resume", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"semfl: error: {exc.name} is not installed; install the [{extra}] extra: "
              f"pip install -e '.[{extra}]'", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - user errors become one line; anything else is a bug: traceback
        if not isinstance(exc, _user_error_types()):
            raise
        print(f"semfl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
