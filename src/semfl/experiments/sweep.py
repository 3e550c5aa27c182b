"""`semfl sweep`: run a grid of configs into one folder, then one comparison report.

A sweep file is an ordinary config (any config keys, or ``base = "other.toml"`` to start from
another config file, resolved relative to the sweep file) plus a ``[sweep]`` table::

    base = "fashion-mnist.toml"
    rounds = 10
    [sweep]
    name = "contenders-fmnist"            # default out: runs/sweeps/<name> (default name: the file's stem)
    method = ["psfl", "fedavg"]           # an axis: a list of values for one (dotted) config key
    seed = [0, 1]
    "data.dirichlet_alpha" = [0.1, 0.9]
    [sweep.variants]                      # named sets of overrides (ablations, per-method settings)
    "psfl-no-pld" = ["method=psfl", "psfl.pld=false"]
    "fedavg" = ["model.arch=gsc-m"]

The grid is the Cartesian product of the axes. The ``method`` axis and ``[sweep.variants]`` form
ONE dimension, the *variant*: every method ``m`` on the axis is a variant named ``m`` with the
override ``method=m``; a variant named after an axis method extends it (its overrides apply after
``method=m``, so ``fedavg = ["model.arch=gsc-m"]`` gives FedAvg a GSC-M model); any other variant
stands alone (give it ``method=...`` unless the base's method is meant). So the example above has
three variants: psfl, fedavg (on GSC-M) and psfl-no-pld. Method tables of the base and sweep file
(``[psfl]``, ...) apply to the points whose method reads them; the others leave them out.

Each config is: base file ← sweep file keys ← the point's axis values ← its variant's overrides ←
the command line's ``--set``. A ``--set sweep.KEY=VALUE`` changes the ``[sweep]`` table instead
(``--set sweep.seed=[0]``). Every point is one run directory ``<out>/<label>/``, label =
``<variant>__<axis values>__s<seed>`` (axes with a single value are left out of the label, the
seed never is), e.g. ``psfl-no-pld__alpha0.1__s0``.

Re-running a sweep skips finished runs (checkpoint round == rounds and report.html present),
resumes unfinished ones from their checkpoint and starts missing ones. A point that fails is
recorded in ``<out>/sweep.json`` and the sweep goes on; the exit status is 1 if any point failed.
At the end the comparison report (``semfl.experiments.compare``) is written into ``<out>``.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import re
import sys
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semfl.config import Config, ConfigError, apply_overrides, drop_foreign_tables, dump_config, from_dict, load_config
from semfl.files import folder_lock

SWEEP_OPTIONS = ("name", "variants")  # keys of [sweep] that are not axes
# short names of axes in labels; any other axis uses the last part of its dotted key
SHORT = {"data.dirichlet_alpha": "alpha", "seed": "s", "users": "u", "rounds": "r", "dataset": "",
         "eval.snr_db": "snr", "channel.snr_db": "snr", "link.snr_max_db": "snrmax", "model.arch": "",
         "data.partition": "", "channel.kind": "", "scale": "", "data.user_fraction": "frac"}


@dataclass
class Point:
    label: str
    variant: str
    overrides: list[str]  # TOML-literal key=value overrides of this point, in the order applied
    raw: dict[str, Any]  # the point's full raw config (before validation)
    values: dict[str, Any] = field(default_factory=dict)  # its value on every axis (seed included)
    state: str = "new"  # before running: new | resume | done | invalid
    status: str = "pending"  # after: skipped | finished | failed | pending
    error: str = ""
    wall_s: float = 0.0

    def config(self) -> Config:
        # the shared tables of a sweep serve several methods: each point keeps its method's
        return from_dict(drop_foreign_tables(copy.deepcopy(self.raw)))


@dataclass
class Sweep:
    name: str
    file: Path | None
    axes: dict[str, list[Any]]
    variants: dict[str, list[str]]
    points: list[Point] = field(default_factory=list)


# ------------------------------------------------------------------ reading

def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"sweep: no such file {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"sweep: {path} is not valid TOML ({exc})") from None


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: tables merge key by key, anything else in ``over`` replaces ``base``."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_file(path: Path, _seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config keys with ``base`` chains resolved, the file's own [sweep] table)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"base: {path} includes itself")
    raw = _read_toml(path)
    table = raw.pop("sweep", {})
    if not isinstance(table, dict):
        raise ConfigError(f"sweep: expected a table in {path}")
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"base: expected a file name, got {base!r}")
        base_raw, _ = resolve_file(path.parent / base, _seen + (path,))  # a base's own [sweep] is ignored
        raw = merge(base_raw, raw)
    return raw, table


def literal(value: Any) -> str:
    """A value as a TOML literal, as ``--set`` reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return repr(value)


def _component(key: str, value: Any) -> str:
    short = SHORT.get(key, key.split(".")[-1])
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    if isinstance(value, str):
        text = f"{short}-{text}" if short else text
    else:
        text = f"{short}{text}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def _refuse_sets_of_the_grid(point_sets: list[str], axes: dict[str, list], variants: dict[str, list[str]]) -> None:
    """A ``--set`` applies to every point after its axis values and variant, so one of a key that an
    axis or a variant sets (or of a table holding such a key) would run the same value in every
    point under labels that say otherwise: refused, naming what to change instead."""
    def covers(key: str, grid_key: str) -> bool:
        return grid_key == key or grid_key.startswith(key + ".")

    for key in dict.fromkeys(s.split("=", 1)[0].strip() for s in point_sets):
        axis = next((a for a in axes if covers(key, a)), None)
        if axis is not None:
            raise ConfigError(f"--set {key}=...: {axis} is an axis of this sweep ({literal(axes[axis])}), so every "
                              f"point would take the same value under its own label; change the axis instead: "
                              f"--set sweep.{axis}=[...]")
        for name, sets in variants.items():
            set_there = next((k for k in (v.split("=", 1)[0].strip() for v in sets) if covers(key, k)), None)
            if set_there is not None:
                raise ConfigError(f"--set {key}=...: the sweep's variant {name!r} sets {set_there} itself, and the "
                                  f"--set would override it under the variant's name; change the variant in the "
                                  f"sweep file instead")


def load_sweep(path: str | Path, cli_sets: list[str] | None = None) -> Sweep:
    """Read a sweep file and expand its grid (configs are validated later, per point)."""
    path = Path(path)
    raw, table = resolve_file(path)
    cli_sets = list(cli_sets or [])
    sweep_sets = [s[len("sweep."):] for s in cli_sets if s.strip().startswith("sweep.")]
    point_sets = [s for s in cli_sets if not s.strip().startswith("sweep.")]
    table = apply_overrides(copy.deepcopy(table), sweep_sets)
    name = table.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"sweep.name: expected a string, got {name!r}")
    variants = table.get("variants", {})
    if not isinstance(variants, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                                 for v in variants.values()):
        raise ConfigError("sweep.variants: expected a table of name = [\"key=value\", ...]")
    axes: dict[str, list[Any]] = {}
    for key, values in table.items():
        if key in SWEEP_OPTIONS:
            continue
        if isinstance(values, dict):  # a TOML sub-table [sweep.data] = {dirichlet_alpha = [...]}
            for sub, vals in _flatten(values, key):
                axes[sub] = vals
            continue
        axes[key] = values
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{key}: expected a non-empty list of values, got {values!r}"
                              + (f" (a list: {key} = [{literal(values)}] in the file, --set sweep.{key}=[{literal(values)}]"
                                 " on the command line)" if not isinstance(values, (list, dict)) else ""))
        if len(set(map(literal, values))) != len(values):
            raise ConfigError(f"sweep.{key}: repeated values {values!r}")

    _refuse_sets_of_the_grid(point_sets, axes, variants)

    # the variant dimension: method axis values, then variants (merged by name)
    dim: dict[str, list[str]] = {}
    for m in axes.pop("method", []):
        dim[str(m)] = [f"method={literal(m)}"]
    for vname, sets in variants.items():
        dim[vname] = dim.get(vname, []) + list(sets)
    if not dim:
        dim[str(raw.get("method", "fedavg"))] = []

    sweep = Sweep(name=name, file=path, axes=axes, variants=dim)
    keys = list(axes)
    labelled = [k for k in keys if k != "seed" and len(axes[k]) > 1]
    for vname, sets in dim.items():
        for values in itertools.product(*(axes[k] for k in keys)):
            point_raw = copy.deepcopy(raw)
            overrides = [f"{k}={literal(v)}" for k, v in zip(keys, values)] + list(sets)
            try:
                apply_overrides(point_raw, overrides + point_sets)
            except ConfigError as exc:
                point_raw = {"__error__": str(exc)}
            chosen = dict(zip(keys, values))
            parts = [_component("", vname) if vname else "x"] + [_component(k, chosen[k]) for k in labelled]
            seed = chosen.get("seed", point_raw.get("seed", 0))
            parts.append(_component("seed", seed))
            sweep.points.append(Point(label="__".join(parts), variant=vname, overrides=overrides, raw=point_raw,
                                      values=chosen))
    labels = [p.label for p in sweep.points]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ConfigError(f"sweep: points share a label ({', '.join(dupes)}); rename variants or axis values")
    return sweep


def point_components(point: Point) -> list[str]:
    """The point's variant and its value on every axis but the seed, as label parts; unlike the label,
    single-valued axes are included (so a claim's group ``fedcl__u5`` still names the point when
    ``--set sweep.users=[5]`` leaves that axis out of the labels)."""
    return [_component("", point.variant)] + [_component(k, v) for k, v in point.values.items() if k != "seed"]


def _flatten(table: dict[str, Any], prefix: str):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


# ------------------------------------------------------------------ state of run directories

def checkpoint_round(run_dir: Path, cfg: Config | None = None) -> int | None:
    """The last round in a run's checkpoint; with ``cfg``, a run that stopped on convergence
    (eval.stop_when_converged) counts as having reached cfg.rounds."""
    from semfl.protocol.checkpoint import load_checkpoint
    from semfl.runtimes.run import CHECKPOINT

    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        import torch

        state = torch.load(path, weights_only=False, map_location="cpu", mmap=True)
    except Exception:  # noqa: BLE001 - older formats: a plain load
        state = load_checkpoint(path)
    if cfg is not None and state.get("stopped_converged"):
        return cfg.rounds
    return int(state["round"])


def run_state(run_dir: Path, cfg: Config) -> str:
    """new | resume | done, or raise ConfigError when the folder holds a run of another config."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        return "new"
    if dump_config(load_config(config_path, foreign="drop")) != dump_config(cfg):
        raise ConfigError(f"{run_dir}: holds a run with a different config; delete it or sweep into another --out")
    round_ = checkpoint_round(run_dir, cfg)
    if round_ is not None and round_ >= cfg.rounds and (run_dir / "report.html").is_file():
        return "done"
    return "resume"


def plan(sweep: Sweep, out: Path) -> None:
    """Fill every point's state (new / resume / done / invalid) from what ``out`` holds."""
    for point in sweep.points:
        try:
            if "__error__" in point.raw:
                raise ConfigError(point.raw["__error__"])
            point.state = run_state(out / point.label, point.config())
            point.error = ""
        except Exception as exc:  # noqa: BLE001 - a bad config or an unreadable run folder: this point only
            point.state, point.error = "invalid", str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"


def require_a_valid_point(points: list[Point], what: str) -> None:
    """After :func:`plan`: one error (naming the first point's) when no point of ``points`` can run,
    e.g. an axis key or override that names no config field, before anything is written."""
    if points and all(p.state == "invalid" for p in points):
        errors = sorted({p.error for p in points})
        more = f" (and {len(errors) - 1} other errors)" if len(errors) > 1 else ""
        first = points[0]
        axis = next((k for k in first.values if first.error.startswith(f"{k}:")), None)
        source = f", from the sweep's axis sweep.{axis}" if axis else ""
        raise ConfigError(f"{what}; {first.label}: {first.error}{source}{more}")


# ------------------------------------------------------------------ running

def write_sweep_json(sweep: Sweep, out: Path, cli_sets: list[str]) -> None:
    from semfl.files import atomic_text

    doc = {"name": sweep.name, "file": str(sweep.file) if sweep.file else None, "set": cli_sets,
           "axes": sweep.axes, "variants": sweep.variants,
           "points": [{"label": p.label, "variant": p.variant, "overrides": p.overrides, "state": p.state,
                       "status": p.status, "error": p.error, "wall_s": round(p.wall_s, 3),
                       "run_dir": p.label} for p in sweep.points]}
    atomic_text(out / "sweep.json", json.dumps(doc, indent=1, default=str))


def _table(sweep: Sweep, title: str, final: bool):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("point")
    table.add_column("state")
    if final:
        table.add_column("status")
        table.add_column("wall s", justify="right")
    table.add_column("note", overflow="fold")
    colours = {"done": "green", "resume": "yellow", "new": "cyan", "invalid": "red",
               "finished": "green", "skipped": "green", "failed": "red", "pending": "dim"}
    for i, p in enumerate(sweep.points, 1):
        cells = [str(i), p.label, f"[{colours[p.state]}]{p.state}[/]"]
        if final:
            cells += [f"[{colours[p.status]}]{p.status}[/]", f"{p.wall_s:.1f}"]
        cells.append(p.error)
        table.add_row(*cells)
    return table


def _run_point(cfg: Config, run_dir: Path, resume: bool, quiet: bool) -> None:
    from semfl.runtimes.run import Runner

    Runner(cfg, run_dir, resume=resume, show_progress=not quiet, log=(lambda m: None) if quiet else None).execute()
    (run_dir / "sweep_error.txt").unlink(missing_ok=True)


def _record_failure(point, out: Path, error: str, tb: str, console) -> None:
    point.status, point.error = "failed", error
    console.print(f"[red]{point.label} failed: {point.error}[/]")
    (out / point.label).mkdir(parents=True, exist_ok=True)
    (out / point.label / "sweep_error.txt").write_text(tb)


def _worker(cfg: Config, run_dir: str, resume: bool, threads: int) -> tuple[float, str, str]:
    """One point in a worker process: (wall seconds, error or '', traceback or '')."""
    import torch

    torch.set_num_threads(threads)
    tic = time.perf_counter()
    try:
        _run_point(cfg, Path(run_dir), resume, quiet=True)
        return time.perf_counter() - tic, "", ""
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which records it
        return time.perf_counter() - tic, f"{type(exc).__name__}: {exc}", traceback.format_exc()


def _run_parallel(sweep: Sweep, todo: list, out: Path, cli_sets: list[str], jobs: int, console) -> None:
    """Points in `jobs` worker processes (spawned: no state shared with this one), each with an equal
    share of the cores; sweep.json is written by this process only, as each point ends."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    threads = max(1, (os.cpu_count() or 1) // jobs)
    console.print(f"running {len(todo)} points in {jobs} processes, {threads} thread(s) each (progress bars off)")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool, \
            Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"sweep {sweep.name}", total=len(todo))
        futures = {pool.submit(_worker, point.config(), str(out / point.label), point.state == "resume", threads):
                   (i, point) for i, point in todo}
        for future in as_completed(futures):
            bar.advance(task)
            i, point = futures[future]
            try:
                wall, error, tb = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker that died (killed, out of memory)
                wall, error, tb = 0.0, f"{type(exc).__name__}: {exc}", traceback.format_exc()
            point.wall_s += wall
            if error:
                _record_failure(point, out, error, tb, console)
            else:
                point.status, point.error = "finished", ""
                bar.console.print(f"[{i}/{len(sweep.points)}] {point.label} finished in {wall:.0f} s")
            write_sweep_json(sweep, out, cli_sets)


def run_sweep(sweep: Sweep, out: Path, cli_sets: list[str] | None = None, quiet: bool = False,
              compare: bool = True, jobs: int = 1) -> int:
    from rich.console import Console

    with folder_lock(Path(out), "sweep folder"):  # FolderBusy if another sweep or verify writes it
        return _run_sweep(sweep, Path(out), list(cli_sets or []), quiet, compare, jobs, Console(stderr=True))


def _run_sweep(sweep: Sweep, out: Path, cli_sets: list[str], quiet: bool, compare: bool, jobs: int, console) -> int:
    plan(sweep, out)
    counts = {s: sum(p.state == s for p in sweep.points) for s in ("done", "resume", "new", "invalid")}
    console.print(_table(sweep, f"sweep {sweep.name}: {len(sweep.points)} points "
                                f"({counts['done']} done, {counts['resume']} to resume, {counts['new']} new"
                                f"{', %d invalid' % counts['invalid'] if counts['invalid'] else ''}) -> {out}", False))
    write_sweep_json(sweep, out, cli_sets)
    _warn_objectives(sweep, console)
    todo = []
    for i, point in enumerate(sweep.points, 1):
        if point.state == "done":
            point.status = "skipped"
        elif point.state == "invalid":
            point.status = "failed"
            console.print(f"[red][{i}/{len(sweep.points)}] {point.label}: {point.error}[/]")
            write_sweep_json(sweep, out, cli_sets)
        else:
            todo.append((i, point))
    if jobs > 1 and len(todo) > 1:
        _run_parallel(sweep, todo, out, cli_sets, jobs, console)
    for i, point in ([] if jobs > 1 and len(todo) > 1 else todo):
        console.print(f"[bold][{i}/{len(sweep.points)}] {point.label}[/] ({point.state})")
        tic = time.perf_counter()
        try:
            _run_point(point.config(), out / point.label, point.state == "resume", quiet)
            point.status, point.error = "finished", ""
        except KeyboardInterrupt:
            point.status, point.error = "failed", "interrupted"
            point.wall_s += time.perf_counter() - tic
            write_sweep_json(sweep, out, cli_sets)
            raise
        except Exception as exc:  # noqa: BLE001 - one failing point must not stop the sweep
            _record_failure(point, out, f"{type(exc).__name__}: {exc}", traceback.format_exc(), console)
        point.wall_s += time.perf_counter() - tic
        write_sweep_json(sweep, out, cli_sets)
    write_sweep_json(sweep, out, cli_sets)
    console.print(_table(sweep, f"sweep {sweep.name}: results", True))
    failed = [p for p in sweep.points if p.status == "failed"]
    if compare:
        dirs = [out / p.label for p in sweep.points if (out / p.label / "metrics.jsonl").is_file()
                and p.status in ("finished", "skipped")]
        if dirs:
            from semfl.experiments.compare import write_comparison

            try:
                report = write_comparison(dirs, out, title=f"sweep {sweep.name}")
                console.print(f"comparison report: {report}")
            except Exception as exc:  # noqa: BLE001
                console.print(f"[red]comparison report failed: {type(exc).__name__}: {exc}[/]")
                return 1
    if failed:
        console.print(f"[red]{len(failed)} of {len(sweep.points)} points failed: "
                      f"{', '.join(p.label for p in failed)} (details in {out / 'sweep.json'})[/]")
        return 1
    return 0


def _warn_objectives(sweep: Sweep, console) -> None:
    """Say which compared points train on another objective without naming it (semfl.objective)."""
    from semfl.experiments.objectives import objective_conflicts

    for line in objective_conflicts(sweep):
        console.print(f"[yellow]objective differs: {line}[/]")


def dry_run(sweep: Sweep, out: Path) -> int:
    from rich.console import Console

    plan(sweep, Path(out))
    console = Console()
    console.print(_table(sweep, f"sweep {sweep.name}: {len(sweep.points)} points -> {out} (dry run)", False))
    _warn_objectives(sweep, console)
    for p in sweep.points:
        console.print(f"{p.label}: {' '.join(p.overrides) or '(base config)'}", highlight=False, soft_wrap=True)
    return 1 if any(p.state == "invalid" for p in sweep.points) else 0


# ------------------------------------------------------------------ CLI

def cmd_sweep(args) -> int:
    if args.jobs < 1:
        print(f"semfl: error: --jobs: must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    sweep = load_sweep(args.config, args.set)
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / sweep.name
    plan(sweep, out)  # reads only
    require_a_valid_point(sweep.points, f"{args.config}: no point of the sweep is valid")
    if args.dry_run:
        return dry_run(sweep, out)
    try:
        return run_sweep(sweep, out, args.set, quiet=args.quiet, compare=not args.no_compare, jobs=args.jobs)
    except KeyboardInterrupt:
        print(f"semfl: sweep interrupted; run the same command again to resume ({out / 'sweep.json'})", file=sys.stderr)
        return 130

