"""The `semfl` command line: run, models, data, report (and more as methods arrive)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from semfl.config import ConfigError, load_config


def _default_out(config: str | None, cfg) -> Path:
    stem = Path(config).stem if config else cfg.method
    return Path("runs") / f"{stem}-{cfg.method}-s{cfg.seed}"


def cmd_run(args) -> int:
    from semfl.runtimes.run import Runner

    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else _default_out(args.config, cfg)
    run_dir = Runner(cfg, out, resume=args.resume, show_progress=not args.quiet).execute()
    print(f"run directory: {run_dir}\nreport: {run_dir / 'report.html'}")
    return 0


def cmd_models(args) -> int:
    from semfl.models.catalogue import model_table

    rows = model_table(args.scale, args.dataset)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'scale':<6} {'arch':<8} {'role':<10} {'parameters':>14}  image")
    for r in rows:
        print(f"{r['scale']:<6} {r['arch']:<8} {r['role']:<10} {r['parameters']:>14,}  {r['image']}")
    return 0


def cmd_data(args) -> int:
    from semfl import data as datamod

    ds = datamod.load_dataset(args.dataset, args.root, download=not args.no_download)
    root = datamod.resolve_root(args.dataset, args.root)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semfl", description="Federated learning of semantic-communication models")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one experiment from a TOML config")
    run.add_argument("config", nargs="?", help="TOML config (omit for all defaults)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. train.lr=0.05")
    run.add_argument("--out", help="run directory (default runs/<config>-<method>-s<seed>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    models = sub.add_parser("models", help="list model presets with parameter counts")
    models.add_argument("--scale", choices=["tiny", "cpu", "paper", "all"], default="all")
    models.add_argument("--dataset", default="fashion-mnist", help="image shape to count for (default fashion-mnist)")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    data = sub.add_parser("data", help="check that a dataset loads (downloads it when allowed)")
    data.add_argument("dataset")
    data.add_argument("--root")
    data.add_argument("--no-download", action="store_true")
    data.set_defaults(func=cmd_data)

    report = sub.add_parser("report", help="rebuild a run directory's figures and report.html")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    from semfl.data import DataError
    from semfl.runtimes.run import RunError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, RunError) as exc:
        print(f"semfl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semfl: interrupted; resume with --resume", file=sys.stderr)
        return 130



def cmd_pretrain(args) -> int:
    """MAE-pretrain one user's mentor on that user's own data; save it in MAE's checkpoint layout."""
    import torch

    from semfl.wireless.channel import make_channel
    from semfl.methods.psfl.psfl import choose_mentors
    from semfl.models import build_model
    from semfl.models.gsc import pretrain_mae
    from semfl.protocol import seeding
    from semfl.files import atomic_write
    from semfl.runtimes.run import prepare_data

    cfg = load_config(args.config, args.set)
    dataset, parts, _ = prepare_data(cfg)
    if not 0 <= args.user < cfg.users:
        raise ConfigError(f"--user: must be in [0, {cfg.users - 1}], got {args.user}")
    arch = args.arch or choose_mentors([len(p) for p in parts], cfg.table("psfl"), cfg.data.user_fraction)[args.user]
    torch.manual_seed(seeding.derive_seed(cfg.seed, "mentor", args.user))
    model = build_model(arch, cfg.scale, dataset.spec, make_channel(cfg.channel))
    images = dataset.train_x[torch.from_numpy(parts[args.user])]
    losses = pretrain_mae(model, images, args.epochs, cfg.train.batch_size, args.lr,
                          seed=seeding.derive_seed(cfg.seed, "pretrain", args.user),
                          progress=lambda epoch, loss: print(f"epoch {epoch}: masked-patch loss {loss:.5f}"))
    atomic_write(Path(args.out), lambda h: torch.save({"model": model.state_dict(), "arch": arch, "losses": losses}, h))
    print(f"{arch} of user {args.user} ({len(images)} images) pretrained; saved to {args.out}")
    return 0


def _register_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="MAE-pretrain a user's PSFL mentor on its own data")
    p.add_argument("config", nargs="?", help="TOML config (omit for all defaults)")
    p.add_argument("--user", type=int, default=0)
    p.add_argument("--arch", choices=["gsc-m", "gsc-l", "gsc-h"], help="default: the user's mentor by the config's rule")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1.5e-4 * 4)
    p.add_argument("--out", required=True, help="checkpoint file (MAE layout: {'model': state_dict})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_pretrain)


_EXTRA_COMMANDS.append(_register_pretrain)


def _register_sweep_and_compare(sub) -> None:
    from semfl.experiments import sweep  # light: matplotlib and torch load only when a command runs

    sweep.register(sub)
    sweep.register_compare(sub)


_EXTRA_COMMANDS.append(_register_sweep_and_compare)


def _register_bench(sub) -> None:
    from semfl.experiments.bench import bench  # light: torch loads when the module does, only semfl.bench's own imports

    bench.register(sub)


_EXTRA_COMMANDS.append(_register_bench)


def _register_baseline(sub) -> None:
    from semfl.experiments import digital_baseline  # light: heavy imports happen inside its commands

    digital_baseline.register(sub)


_EXTRA_COMMANDS.append(_register_baseline)


def _cmd_verify(args) -> int:
    from semfl.experiments.verify import cmd_verify  # scipy, torch and the sweep machinery load only here

    return cmd_verify(args)


def _register_verify(sub) -> None:
    p = sub.add_parser("verify", help="check a paper's claims (configs/claims/PAPER.toml): paired differences "
                                      "over seeds with 95 %% intervals and verdicts")
    p.add_argument("paper", help="psfl, fedcl, fedsfr, finefed (configs/claims/<paper>.toml) or a claims file")
    p.add_argument("--runs", help="folder of the claims' sweeps (default runs/verify/<paper>)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to use (default: the claims file's reporting seeds)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override every run of the claims (sweep.KEY=VALUE edits the sweep grids)")
    p.add_argument("--claims", nargs="+", metavar="ID", help="only these claims")
    p.add_argument("--run-missing", action="store_true", help="run (or resume) the runs that have not finished")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="with --run-missing: N runs at once")
    p.add_argument("--out", help="verdict table file (default <runs>/verdicts.md; a .json copy beside it)")
    p.set_defaults(func=_cmd_verify)


_EXTRA_COMMANDS.append(_register_verify)


def _register_deploy(sub) -> None:
    from semfl.runtimes.flower import deploy

    deploy.register(sub)


_EXTRA_COMMANDS.append(_register_deploy)


def _register_use(sub) -> None:
    from semfl.experiments import transmit  # light: torch loads inside the commands

    transmit.register(sub)


_EXTRA_COMMANDS.append(_register_use)


if __name__ == "__main__":
    sys.exit(main())
