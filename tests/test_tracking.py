"""Experiment tracking: TensorBoard events and MLflow runs hold exactly the run's metrics rows,
read back with the trackers' own readers."""
from __future__ import annotations

import pytest

from semfl.cli import main
from semfl.config import ConfigError, load_config
from semfl.files import read_jsonl
from semfl.runtimes.run import Runner
from semfl.runtimes.tracking import scalars


def tiny_run(overrides, out, extra):
    cfg = load_config(None, overrides + ["data.max_per_user=60", "rounds=2", *extra])
    return Runner(cfg, out, show_progress=False, log=lambda m: None).execute()


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory):
    """An empty MLflow SQLite store, made once: creating one runs MLflow's ~50 schema migrations
    (seconds); each test copies it, so it still starts from an empty store of its own."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def sqlite_store(migrated_db, tmp_path) -> str:
    import shutil

    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# the tests that copy migrated_db: one worker makes it once
MLFLOW_SQLITE = pytest.mark.xdist_group("mlflow-sqlite-store")


def test_scalars_name_rows_by_scope():
    assert scalars({"round": 3, "method": "fedavg", "scope": "global", "psnr_db": 20.5, "violations": 0,
                    "mentors": "gsc-m", "flag": True}) == {"global/psnr_db": 20.5, "global/violations": 0.0}
    assert scalars({"round": 1, "scope": "user", "user": 2, "loss": 0.5}) == {"user2/loss": 0.5}
    assert scalars({"round": 1, "scope": "link", "user": 0, "uplink_bits": 64}) == {"link/user0/uplink_bits": 64.0}


def test_tensorboard_events_hold_every_metrics_row(tiny_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tiny_run(tiny_overrides, tmp_path / "run", ["log.tensorboard=true", "log.figures=true"])
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for tag, value in scalars(row).items():
            expected.setdefault(tag, []).append((row["round"], value))
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(step, pytest.approx(value, rel=1e-6)) for step, value in points], tag
    assert [r["psnr_db"] for r in rows if r["scope"] == "global" and "psnr_db" in r] == \
        pytest.approx([e.value for e in events.Scalars("global/psnr_db")], rel=1e-6)
    (image,) = events.Images("reconstructions")
    assert image.step == 2 and image.width > 100 and image.height > 100  # the reconstruction grid


@pytest.mark.parametrize("store", [pytest.param("sqlite", marks=MLFLOW_SQLITE), "file"])
def test_mlflow_run_holds_params_metrics_and_artefacts(tiny_overrides, tmp_path, store, request):
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(request.getfixturevalue("migrated_db"), tmp_path) if store == "sqlite" else \
        (tmp_path / "mlruns").as_uri()
    run_dir = tiny_run(tiny_overrides, tmp_path / "run", [f"log.mlflow_uri={uri}", "log.mlflow_experiment=tests",
                                                                "log.figures=true"])
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.lr"] == "0.05" and run.data.params["method"] == "fedavg"
    assert run.data.tags["semfl.run_dir"] == str(run_dir.resolve())
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["scope"] == "global" and "psnr_db" in r]
    history = client.get_metric_history(run.info.run_id, "global/psnr_db")
    assert sorted((m.step, m.value) for m in history) == [(r["round"], pytest.approx(r["psnr_db"])) for r in rows]
    user = client.get_metric_history(run.info.run_id, "user1/train_loss")
    assert len(user) == 2
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.toml", "metrics.jsonl", "report.html", "figures"} <= artefacts
    assert run.info.artifact_uri.startswith(tmp_path.as_uri())  # beside the store, not in the working folder


@MLFLOW_SQLITE
def test_each_sweep_point_is_its_own_mlflow_run(tiny_overrides, tmp_path, migrated_db):
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(migrated_db, tmp_path)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('rounds = 1\n[sweep]\nname = "two-seeds"\nseed = [0, 1]\n')
    sets = [a for o in tiny_overrides + ["data.max_per_user=60", f"log.mlflow_uri={uri}"] for a in ("--set", o)]
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "out"), "--quiet", "--no-compare", *sets]) == 0
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("semfl").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["fedavg__s0", "fedavg__s1"]
    assert {r.data.tags["semfl.group"] for r in runs} == {"out"} and {r.data.params["seed"] for r in runs} == {"0", "1"}


def test_tracking_is_off_by_default_and_its_table_is_checked(tiny_overrides, tmp_path):
    run_dir = tiny_run(tiny_overrides, tmp_path / "run", [])
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "checkpoint" / "round-1").exists()
    # [log] is not part of the experiment: a resume may turn a tracker on
    cfg = load_config(None, tiny_overrides + ["data.max_per_user=60", "rounds=2", "log.tensorboard=true"])
    Runner(cfg, run_dir, resume=True, show_progress=False, log=lambda m: None).execute()
    assert (run_dir / "tensorboard").is_dir()
    with pytest.raises(ConfigError, match="log.checkpoint_every: must be >= 0"):
        load_config(None, ["log.checkpoint_every=-1"])
    with pytest.raises(ConfigError, match="log.tensorboard: expected true/false"):
        load_config(None, ["log.tensorboard=3"])
