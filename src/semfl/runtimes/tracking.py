"""Experiment tracking: a run's metrics rows, parameters and artefacts in TensorBoard and MLflow.

Off by default; ``[log]`` turns them on (``log.tensorboard = true``, ``log.mlflow_uri = "..."``).
Both are optional dependencies (``pip install semfl[tracking]``: tensorboard, mlflow-skinny).
Every row the runner appends to metrics.jsonl is logged as it is written, with the round as the
step: global rows as ``global/<field>``, user rows as ``user<k>/<field>``, link rows as
``link/user<k>/<field>`` (numbers only). At the end the reconstruction grid goes to TensorBoard as
an image, and config.toml, metrics.jsonl, report.html and figures/ to MLflow as artefacts. Each run
directory is its own tracked run (so each point of a sweep is one), tagged with the folder that
holds it; a resumed run continues the MLflow run of its directory.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from semfl.config import Config, ConfigError

SKIPPED = ("round", "user", "scope", "method")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's numeric fields under their tracking names (see the module docstring)."""
    scope = row.get("scope", "global")
    prefix = "global/" if scope == "global" else f"user{row['user']}/" if scope == "user" else f"link/user{row.get('user')}/"
    return {prefix + k: float(v) for k, v in row.items()
            if k not in SKIPPED and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = str(value)
    return out


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artefacts: beside a SQLite database (MLflow's default is
    ./mlruns in whatever folder the run started from); a file store or a server decides itself."""
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):]).resolve()
        return (database.parent / "mlartifacts" / experiment).as_uri()
    return None


class TensorBoardSink:
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise ConfigError(f"log.tensorboard: needs the tensorboard package (pip install semfl[tracking]): {exc}") from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def rows(self, rows: list[dict]) -> None:
        for row in rows:
            for tag, value in scalars(row).items():
                self.writer.add_scalar(tag, value, global_step=int(row["round"]))
        self.writer.flush()

    def finish(self, out_dir: Path, last_round: int) -> None:
        grid = out_dir / "figures" / "reconstructions.png"
        if grid.is_file():
            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(grid).convert("RGB"))
            self.writer.add_image("reconstructions", image, global_step=last_round, dataformats="HWC")
        self.close()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowSink:
    def __init__(self, cfg: Config, out_dir: Path, resume: bool):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError(f"log.mlflow_uri: needs mlflow (pip install semfl[tracking]): {exc}") from None
        from mlflow.entities import Param

        if cfg.log.mlflow_uri.startswith("file:") or "://" not in cfg.log.mlflow_uri:
            # MLflow 3 keeps its file store in maintenance mode behind this switch; naming a folder asks for it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=cfg.log.mlflow_uri)
        name = cfg.log.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else \
            self.client.create_experiment(name, artifact_location=artifact_root(cfg.log.mlflow_uri, name))
        run_dir = str(Path(out_dir).resolve())
        previous = self.client.search_runs([experiment_id], filter_string=f"tags.`semfl.run_dir` = '{run_dir}'",
                                           max_results=1) if resume else []
        if previous:
            self.run_id = previous[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"semfl.run_dir": run_dir, "semfl.group": Path(run_dir).parent.name, "semfl.method": cfg.method,
                "semfl.dataset": cfg.dataset}
        self.run_id = self.client.create_run(experiment_id, run_name=Path(out_dir).name, tags=tags).info.run_id
        params = [Param(k, v[:6000]) for k, v in sorted(flat_params(cfg.to_dict()).items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def rows(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(tag, value, stamp, int(row["round"]))
                   for row in rows for tag, value in scalars(row).items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def finish(self, out_dir: Path, last_round: int) -> None:
        for name in ("config.toml", "metrics.jsonl", "report.html", "partition.json", "snr_sweep.json"):
            if (out_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(out_dir / name))
        if (out_dir / "figures").is_dir():
            self.client.log_artifacts(self.run_id, str(out_dir / "figures"), artifact_path="figures")
        self.close()

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class Tracker:
    """The run's trackers (none, TensorBoard, MLflow or both), fed by the runner."""

    def __init__(self, cfg: Config, out_dir: Path, resume: bool = False):
        self.out = Path(out_dir)
        self.sinks: list = []
        if cfg.log.tensorboard:
            self.sinks.append(TensorBoardSink(self.out / "tensorboard"))
        if cfg.log.mlflow_uri:
            self.sinks.append(MLflowSink(cfg, self.out, resume))
        self.last_round = 0

    def rows(self, rows: list[dict]) -> None:
        self.last_round = max([self.last_round] + [int(r["round"]) for r in rows])
        for sink in self.sinks:
            sink.rows(rows)

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish(self.out, self.last_round)
        self.sinks = []

    def close(self, failed: bool = False) -> None:
        for sink in self.sinks:
            sink.close(failed)
        self.sinks = []
