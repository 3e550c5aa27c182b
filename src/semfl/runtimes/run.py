"""One run: build data, classifier, link, transport and method; loop rounds; write the run directory.

Run directory (a stable layout that other tools read): config.toml, metrics.jsonl, partition.json, checkpoint/state.pt,
figures/, report.html. After every round the checkpoint is replaced atomically; --resume
drops metric rows past the checkpoint and continues, giving the metrics of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from semfl import data as datamod
from semfl.config import Config, ConfigError, dump_config, load_config
from semfl.convergence import run_verdict
from semfl.wireless.link import Link, round_totals
from semfl.methods import get_method
from semfl.protocol.method import RunContext, bind
from semfl.models.classifier import frozen_classifier, run_cache_dir
from semfl.protocol.validation import nonfinite_entries
from semfl.protocol import seeding
from semfl.files import atomic_text, folder_lock, read_jsonl, write_jsonl
from semfl.protocol.checkpoint import load_checkpoint, save_checkpoint
from semfl.runtimes.local import LocalTransport
from semfl.runtimes.progress import RunProgress, paper_on_cpu
from semfl.runtimes.workers import resolve_workers

CHECKPOINT = "checkpoint/state.pt"
CHECKPOINT_USERS = "checkpoint/users"  # the local transport's per-user states, one file each


class RunError(RuntimeError):
    pass


def prepare_data(cfg: Config):
    """Dataset, user partition and evaluation subset, all deterministic for the seed."""
    dataset = datamod.load_dataset(cfg.dataset, cfg.data.root, cfg.data.download)
    labels = dataset.train_y.numpy()
    parts = datamod.partition(labels, cfg.users, cfg.data.partition, seed=seeding.derive_seed(cfg.seed, "partition"),
                              alpha=cfg.data.dirichlet_alpha, ways=cfg.data.ways, shots=cfg.data.shots,
                              sigma=cfg.data.ways_shots_sigma, sizes=fitted_sizes(cfg, len(labels)),
                              num_classes=dataset.num_classes)
    if cfg.data.user_fraction < 1:
        rng = seeding.numpy_rng(cfg.seed, "fraction")
        parts = [np.sort(rng.choice(p, max(1, math.ceil(cfg.data.user_fraction * len(p))), replace=False)) for p in parts]
    if cfg.data.max_per_user:
        rng = seeding.numpy_rng(cfg.seed, "cap")
        parts = [np.sort(rng.choice(p, cfg.data.max_per_user, replace=False)) if len(p) > cfg.data.max_per_user else p
                 for p in parts]
    n_test = len(dataset.test_y) if not cfg.data.test_samples else min(cfg.data.test_samples, len(dataset.test_y))
    test_idx = torch.from_numpy(np.sort(seeding.numpy_rng(cfg.seed, "test").choice(len(dataset.test_y), n_test, replace=False)))
    return dataset, parts, test_idx


def fitted_sizes(cfg: Config, available: int) -> list[int] | None:
    """data.sizes as relative volumes scaled to fit the dataset's training samples (data.fit_sizes)."""
    return datamod.fit_sizes(cfg.data.sizes, available) if cfg.data.sizes else None


def build_context(cfg: Config, out_dir: Path | None, log: Callable[[str], None] = print,
                  progress: RunProgress | None = None, with_user_data: bool = True):
    """The run context and, with `with_user_data`, every user's (x, y) on the device (a Flower base
    station holds no user data: it gets None)."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device} requested but CUDA is not available")
    dataset, parts, test_idx = prepare_data(cfg)
    if cfg.data.sizes and sum(cfg.data.sizes) > len(dataset.train_y):
        log(f"data.sizes sum to {sum(cfg.data.sizes)} but {cfg.dataset} has {len(dataset.train_y)} training images: "
            f"used as relative volumes, scaled to {fitted_sizes(cfg, len(dataset.train_y))}")
    cache_dir = run_cache_dir(cfg)
    from semfl.models.classifier import CLASSIFIER_PRESETS

    epochs = cfg.classifier.epochs or CLASSIFIER_PRESETS[cfg.scale].epochs
    if cfg.scale == "paper" and device.type == "cpu":
        log(paper_on_cpu(cfg, dataset, epochs))
    tick = progress.classifier_task(len(dataset.train_y), epochs) if progress else None
    classifier, path, trained = frozen_classifier(
        dataset.spec, cfg.dataset, dataset.train_x, dataset.train_y, scale=cfg.scale, depth=cfg.classifier.depth,
        epochs=cfg.classifier.epochs, lr=cfg.classifier.lr, batch_size=cfg.classifier.batch_size,
        cache_dir=cache_dir, seed=cfg.seed, progress=tick)
    if progress:
        progress.classifier_done()
    log(f"classifier {'trained and cached at' if trained else 'loaded from'} {path}")
    classifier = classifier.to(device)
    link = Link(cfg.link, cfg.users, cfg.seed)
    run = RunContext(cfg=cfg, data=dataset, spec=dataset.spec, parts=parts, classifier=classifier, link=link,
                     device=device, test_x=dataset.test_x[test_idx].to(device), test_y=dataset.test_y[test_idx].to(device),
                     out_dir=out_dir, log=log)
    user_data = [user_slice(run, k) for k in range(cfg.users)] if with_user_data else None
    return run, user_data


def user_slice(run: RunContext, user: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One user's local images and labels, on the run device."""
    index = torch.from_numpy(run.parts[user])
    return run.data.train_x[index].to(run.device), run.data.train_y[index].to(run.device)


def write_partition(run: RunContext, out_dir: Path) -> None:
    hist = datamod.class_histogram(run.data.train_y.numpy(), run.parts, run.data.num_classes)
    atomic_text(out_dir / "partition.json", json.dumps({
        "scheme": run.cfg.data.partition, "sizes": [int(len(p)) for p in run.parts],
        "class_histogram": hist.astype(int).tolist()}, indent=1))


def participants(cfg: Config, round_: int) -> list[int]:
    if cfg.train.participation >= 1:
        return list(range(cfg.users))
    count = max(1, math.ceil(cfg.train.participation * cfg.users))
    chosen = seeding.numpy_rng(cfg.seed, round_, "participation").choice(cfg.users, count, replace=False)
    return sorted(int(u) for u in chosen)


def local_transport(cfg: Config, run: RunContext, user_data, out_dir: Path) -> LocalTransport:
    return LocalTransport(run.link, user_data, cfg.seed, run.device, handlers={},
                          state_memory_mb=cfg.engine.state_memory_mb, spill_dir=out_dir,
                          checkpoint_dir=Path(out_dir) / CHECKPOINT_USERS if out_dir is not None else None,
                          workers=resolve_workers(cfg.engine.workers))


class Runner:
    """Runs a config into a run directory. `transport` builds the transport from (cfg, run context,
    user data, out dir); the default is the in-process local transport. A transport that does not
    need the users' data here (Flower's) sets `needs_user_data = False` on the factory."""

    def __init__(self, cfg: Config, out_dir: Path, resume: bool = False, show_progress: bool = True,
                 log: Callable[[str], None] | None = None, transport: Callable | None = None):
        self.cfg = cfg
        self.make_transport = transport or local_transport
        self.out = Path(out_dir)
        self.resume = resume
        self.progress = RunProgress(cfg, enabled=show_progress)
        self.log = log or self.progress.log
        self.metrics_path = self.out / "metrics.jsonl"
        self.tracker = None

    def _check_directory(self) -> None:
        config_path = self.out / "config.toml"
        if self.resume:
            if not config_path.is_file():
                raise RunError(f"--resume: {self.out} has no config.toml to resume")
            previous = load_config(config_path, foreign="drop")  # old runs held every method's table
            # [log] says what is recorded, not what is computed: a resume may turn trackers on or off
            if dump_config(dataclasses.replace(previous, log=self.cfg.log)) != dump_config(self.cfg):
                raise RunError(f"--resume: the config differs from the one in {config_path}; resume with the same config")
        elif (self.out / "metrics.jsonl").exists():
            raise RunError(f"--out: {self.out} already holds a run; pass --resume to continue it or choose another --out")

    def execute(self) -> Path:
        from semfl.runtimes.tracking import Tracker

        self._check_directory()  # before anything is created: a bad --out or --resume leaves no trace
        with folder_lock(self.out, "run directory"):  # FolderBusy if another process is running it
            self._check_directory()  # again under the lock: another process may have started it meanwhile
            atomic_text(self.out / "config.toml", dump_config(self.cfg))
            self.tracker = Tracker(self.cfg, self.out, self.resume)
            try:
                self._execute()
            except BaseException:
                self.tracker.close(failed=True)
                raise
            self.tracker.finish()
        return self.out

    def _execute(self) -> None:
        with self.progress:
            seeding.enter(self.cfg.seed, "setup")
            run, user_data = build_context(self.cfg, self.out, self.log, self.progress,
                                           with_user_data=getattr(self.make_transport, "needs_user_data", True))
            write_partition(run, self.out)
            method_cls = get_method(self.cfg.method)
            transport = self.make_transport(self.cfg, run, user_data, self.out)
            seeding.enter(self.cfg.seed, "init")
            method = bind(method_cls, run, transport, on_user_done=self.progress.user_done, log=self.log)
            start, rows, wall = self._restore(method, transport)
            if start == 1 and not rows:
                seeding.enter(self.cfg.seed, 0, "eval")
                rows = self._evaluate(method, 0, {})
                next(r for r in rows if r["scope"] == "global").update(self._objective_fields(method_cls))
                self._append(rows)
            history = [r for r in rows if r.get("scope") == "global"]  # for the convergence test
            self.progress.start_rounds(start)
            energy = sum(r.get("uplink_energy_j", 0.0) for r in rows if r.get("scope") == "global")
            for round_ in range(start, self.cfg.rounds + 1):
                tic = time.perf_counter()
                users = participants(self.cfg, round_)
                transport.start_round(round_)
                self.progress.start_round(round_, len(users))
                seeding.enter(self.cfg.seed, round_, "server")
                try:
                    info = method.run_round(round_, users)
                except Exception:
                    info = transport.round_info(round_)
                    missing = set(info.get("missing_users", []))
                    rejected = {r["user"] for r in info.get("rejected_users", [])}
                    if rejected and missing | rejected >= set(users):
                        reasons = " | ".join(f"user {r['user']}: {r['reason']}" for r in info["rejected_users"][:3])
                        raise RunError(f"round {round_}: no valid reply to aggregate (rejected: {reasons}); "
                                       "the checkpoint of the previous round is kept") from None
                    if missing and missing >= set(users):
                        errors = info.get("node_errors", [])
                        if errors:
                            shown = " | ".join(errors[:3]) + (" | …" if len(errors) > 3 else "")
                            cause = f"; the nodes said: {shown}. Fix that, then continue the run with --resume"
                        else:
                            cause = ": the run stopped here: continue it with --resume once the nodes are back"
                        raise RunError(f"round {round_}: no user answered (users {sorted(missing)} missing){cause}") from None
                    raise
                info.update(transport.round_info(round_))
                self._check_finite(method, round_, {})
                wall += time.perf_counter() - tic
                link_rows = run.link.drain(round_)
                totals = round_totals(link_rows, self.cfg.link.eta)
                energy += totals["uplink_energy_j"]
                info.update({k: totals[k] for k in ("uplink_bits", "downlink_bits", "uplink_energy_j",
                                                    "downlink_energy_j", "uplink_delay_s", "violations")})
                info["cumulative_uplink_energy_j"] = energy
                info["wall_s"] = wall
                new_rows = self._round_rows(method, round_, info, link_rows)
                self._check_finite(method, round_, new_rows[0])
                history += [r for r in new_rows if r.get("scope") == "global"]
                stop = self._stops(round_, history)
                if round_ == self.cfg.rounds or stop:
                    new_rows[0].update(self._convergence(history).fields())
                self._append(new_rows)
                state = {"round": round_, "method": method.state_dict(), "transport": transport.state_dict(),
                         "wall_s": wall, "stopped_converged": stop}
                save_checkpoint(self.out / CHECKPOINT, state)
                if self.cfg.log.checkpoint_every and round_ % self.cfg.log.checkpoint_every == 0:
                    keep_checkpoint(self.out, round_, state["transport"])
                transport.checkpoint_saved()
                self.progress.end_round(round_, new_rows[0])
                if stop:
                    self.log(f"round {round_}: converged, stopping before rounds = {self.cfg.rounds} (eval.stop_when_converged)")
                    break
            from semfl.report import plots, write_run_report

            self.log("finishing: figures and report" if self.cfg.log.figures else "finishing: report (log.figures = false)")
            seeding.enter(self.cfg.seed, "finish")
            with plots.drawing(self.cfg.log.figures):
                summary = method.finish(self.out) or {}
        summary = {**summary, "model": method_cls.model_name(self.cfg), **self._objective_fields(method_cls),
                   **self._convergence(read_jsonl(self.metrics_path)).fields()}
        atomic_text(self.out / "summary.json", json.dumps(summary, indent=1, default=str))
        with plots.drawing(self.cfg.log.figures):
            write_run_report(self.out, summary)

    def _objective_fields(self, method_cls) -> dict:
        """What the run trains on (semfl.objective), for metrics row 0 and summary.json."""
        objective = method_cls.objective(self.cfg)
        return objective.fields() if objective is not None else {"train_objective": "not stated by the method"}

    def _stops(self, round_: int, history: list[dict]) -> bool:
        """eval.stop_when_converged: stop after an evaluated round, before the last, whose test passes."""
        return (self.cfg.eval.stop_when_converged and round_ < self.cfg.rounds and self.cfg.evaluates(round_)
                and self._convergence(history).converged)

    def _convergence(self, rows: list[dict]):
        e = self.cfg.eval
        return run_verdict(rows, e.converge_metric, e.converge_window, e.converge_tolerance)

    def _check_finite(self, method, round_: int, global_row: dict) -> None:
        """Stop before a non-finite model (weights, or its evaluated loss: finite but huge weights
        overflow) is evaluated or checkpointed: the last good checkpoint stays for --resume."""
        bad = nonfinite_entries(method.state_dict())
        bad += [f"its test {key} = {global_row[key]}" for key in ("loss", "psnr_db")
                if isinstance(global_row.get(key), float) and not math.isfinite(global_row[key])]
        if bad:
            shown = ", ".join(bad[:3]) + (", …" if len(bad) > 3 else "")
            kept = (f"the checkpoint of round {round_ - 1} in {self.out / CHECKPOINT} is intact (continue with --resume "
                    "once the cause is fixed)") if (self.out / CHECKPOINT).is_file() else "no checkpoint was written yet"
            raise RunError(f"round {round_}: the global model became non-finite ({shown}); the run stops here and {kept}. "
                           "A robust aggregation (aggregation = 'median', 'trimmed_mean' or 'norm_bounded') "
                           "limits what one user's reply can do")

    def _restore(self, method, transport) -> tuple[int, list[dict], float]:
        ckpt_path = self.out / CHECKPOINT
        if not (self.resume and ckpt_path.is_file()):
            if self.metrics_path.exists():
                self.metrics_path.unlink()  # a resumed run that never checkpointed starts over
            return 1, [], 0.0
        state = load_checkpoint(ckpt_path)
        method.load_state_dict(state["method"])
        transport.load_state_dict(state["transport"])
        rows = read_jsonl(self.metrics_path)
        unnumbered = next((i for i, r in enumerate(rows, 1) if not isinstance(r.get("round"), int)), None)
        if unnumbered is not None:
            raise RunError(f"{self.metrics_path}: row {unnumbered} has no integer 'round'; the file is damaged: "
                           "restore it from a copy, or rerun into a new folder")
        rows = [r for r in rows if r["round"] <= state["round"]]
        write_jsonl(self.metrics_path, rows)
        self.log(f"resuming after round {state['round']}")
        if state.get("stopped_converged"):  # it stopped on convergence: nothing left but to finish
            return self.cfg.rounds + 1, rows, state["wall_s"]
        return state["round"] + 1, rows, state["wall_s"]

    def _evaluate(self, method, round_: int, info: dict) -> list[dict]:
        rows = method.evaluate(round_)
        out = []
        for row in rows:
            row = {"round": round_, "method": self.cfg.method, **row}
            if row["scope"] == "global":
                row.update({k: v for k, v in info.items() if k != "user_rows"})
                if "loss" in row:
                    row["objective"] = row["loss"] + self.cfg.link.eta * info.get("cumulative_uplink_energy_j", 0.0)
            out.append(row)
        return out

    def _round_rows(self, method, round_: int, info: dict, link_rows: list[dict]) -> list[dict]:
        due = self.cfg.evaluates(round_)
        seeding.enter(self.cfg.seed, round_, "eval")
        rows = self._evaluate(method, round_, info) if due else self._evaluate_skipped(round_, info)
        users = {r["user"]: r for r in rows if r["scope"] == "user"}
        for extra in info.get("user_rows", []):
            users.setdefault(extra["user"], {"round": round_, "method": self.cfg.method, "scope": "user",
                                             "user": extra["user"]}).update(extra)
        for lr in link_rows:
            users.setdefault(lr["user"], {"round": round_, "method": self.cfg.method, "scope": "user",
                                          "user": lr["user"]})["snr_db"] = lr["snr_db"]
        globals_ = [r for r in rows if r["scope"] == "global"]
        return globals_ + [users[k] for k in sorted(users)] + [{"method": self.cfg.method, **lr} for lr in link_rows]

    def _evaluate_skipped(self, round_: int, info: dict) -> list[dict]:
        row = {"round": round_, "method": self.cfg.method, "scope": "global"}
        row.update({k: v for k, v in info.items() if k != "user_rows"})
        return [row]

    def _append(self, rows: list[dict]) -> None:
        with open(self.metrics_path, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
            handle.flush()
        if self.tracker is not None:
            self.tracker.rows(rows)


def keep_checkpoint(out: Path, round_: int, transport_state: dict) -> None:
    """Keep round_'s checkpoint in checkpoint/round-<t>/ (state.pt and the users' state files it
    names), hard-linked where the file system allows, for semfl.load(round=t) after later rounds."""
    import os
    import shutil

    folder = Path(out) / "checkpoint" / f"round-{round_}"
    names = [n for n in (transport_state.get("state_files") or {}).values() if n]
    pairs = [(Path(out) / CHECKPOINT_USERS / n, folder / "users" / n) for n in names]
    (folder / "users").mkdir(parents=True, exist_ok=True)
    for source, target in pairs + [(Path(out) / CHECKPOINT, folder / "state.pt")]:  # state.pt last: it marks a kept round
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
