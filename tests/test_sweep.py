"""`semfl sweep` and `semfl compare`: grid expansion, base files, skip / resume / failure, summary numbers."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from semfl.cli import main
from semfl.config import ConfigError, load_config
from semfl.experiments.compare import group_runs, load_runs, summarise
from semfl.files import read_jsonl
from semfl.runtimes.local import LocalTransport
from semfl.runtimes.run import Runner
from semfl.experiments.sweep import load_sweep

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "psfl"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def sets(overrides: list[str]) -> list[str]:
    return sum((["--set", o] for o in overrides), [])


def test_grid_product_variants_labels_and_base(tmp_path):
    write(tmp_path / "base.toml", 'method = "fedavg"\nusers = 4\nrounds = 7\n[train]\nlr = 0.3\n')
    path = write(tmp_path / "sweeps" / "grid.toml", """
base = "../base.toml"
rounds = 2
[train]
batch_size = 16
[sweep]
name = "grid"
method = ["psfl", "fedavg"]
seed = [0, 1]
"data.dirichlet_alpha" = [0.1, 0.5, 0.9]
dataset = ["fashion-mnist"]
[sweep.variants]
"psfl" = []
"psfl-no-pld" = ["method=psfl", "psfl.pld=false"]
"fedavg" = ["model.arch=gsc-m"]
""")
    sweep = load_sweep(path, ["users=3"])
    assert sweep.name == "grid"
    assert list(sweep.variants) == ["psfl", "fedavg", "psfl-no-pld"]  # method axis and variants: one dimension
    assert len(sweep.points) == 3 * 2 * 3
    labels = [p.label for p in sweep.points]
    assert len(set(labels)) == len(labels)
    assert "psfl-no-pld__alpha0.1__s0" in labels and "fedavg__alpha0.9__s1" in labels
    point = next(p for p in sweep.points if p.label == "fedavg__alpha0.5__s1")
    cfg = point.config()
    # base <- file keys <- point <- --set
    assert (cfg.method, cfg.model.arch, cfg.seed, cfg.data.dirichlet_alpha) == ("fedavg", "gsc-m", 1, 0.5)
    assert (cfg.rounds, cfg.users, cfg.train.lr, cfg.train.batch_size) == (2, 3, 0.3, 16)
    ablation = next(p for p in sweep.points if p.label == "psfl-no-pld__alpha0.1__s0").config()
    assert ablation.method == "psfl" and ablation.table("psfl").pld is False and ablation.model.arch == "csc"
    # --set sweep.KEY changes the grid
    small = load_sweep(path, ["sweep.seed=[3]", 'sweep.data.dirichlet_alpha=[0.2]'])
    assert [p.label for p in small.points] == ["psfl__s3", "fedavg__s3", "psfl-no-pld__s3"]
    assert small.points[0].config().data.dirichlet_alpha == 0.2


def test_sweep_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="sweep.seed"):
        load_sweep(write(tmp_path / "a.toml", "[sweep]\nseed = 3\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_sweep(write(tmp_path / "b.toml", 'base = "missing.toml"\n[sweep]\nseed = [0]\n'))
    # a sweep without axes or variants is one point of the base method
    sweep = load_sweep(write(tmp_path / "c.toml", 'method = "psfl"\n[sweep]\n'))
    assert [p.label for p in sweep.points] == ["psfl__s0"]


@pytest.mark.parametrize("name", ["sweep-mentor-student", "sweep-dirichlet", "sweep-ablations", "sweep-contenders",
                                  "sweep-study", "sweep-contenders-cifar10"])
def test_shipped_sweeps_expand_to_valid_configs(name):
    sweep = load_sweep(CONFIGS / f"{name}.toml")
    assert sweep.points
    for point in sweep.points:
        cfg = point.config()
        assert cfg.rounds <= 10 and cfg.data.user_fraction <= 0.1
        if cfg.method != "psfl" and point.variant != "centralised-csc":
            assert cfg.model.arch == "gsc-m"
    if name == "sweep-study":
        contenders = {"fedavg", "stc", "fttq", "fedpaq", "centralised", "local"}
        assert {p.variant for p in sweep.points} == ({"psfl", "psfl-no-pld", "psfl-no-agp", "centralised-csc"} | contenders
                                                     | {f"{m}-foundation" for m in contenders})
        assert len(sweep.points) == 32
        for method in contenders:
            control = [p.config() for p in sweep.points if p.variant == f"{method}-foundation"]
            assert control and all(c.method == method and c.table("foundation").global_model for c in control)
            assert not any(p.config().table("foundation").global_model for p in sweep.points if p.variant == method)


@pytest.fixture
def tiny_sweep(tmp_path, tiny_overrides):
    path = write(tmp_path / "sweep.toml", """
rounds = 2
users = 2
[sweep]
name = "tiny"
method = ["fedavg", "psfl"]
seed = [0, 1]
""")
    # small points (48 images a user, 50 test images): the test is about the sweep's bookkeeping
    return path, tiny_overrides + ["users=2", "rounds=2", "eval.snr_sweep=[10.0]", "eval.grid_images=2",
                                   "data.max_per_user=48", "data.test_samples=50", "psfl.user_eval_samples=20"]


def test_tiny_sweep_runs_skips_resumes_and_compares(tiny_sweep, tmp_path, monkeypatch):
    path, overrides = tiny_sweep
    out = tmp_path / "out"
    args = ["sweep", str(path), "--quiet", "--out", str(out)] + sets(overrides)

    # 1st: the first point dies in round 2 (after checkpointing round 1); the others complete
    original = LocalTransport.send
    died = {"n": 0}

    def dying_send(self, users, kind, payload, on_reply=None):
        if self.round == 2 and died["n"] == 0:
            died["n"] += 1
            raise RuntimeError("simulated crash")
        return original(self, users, kind, payload, on_reply)

    monkeypatch.setattr(LocalTransport, "send", dying_send)
    assert main(args) == 1
    monkeypatch.setattr(LocalTransport, "send", original)
    doc = json.loads((out / "sweep.json").read_text())
    status = {p["label"]: p["status"] for p in doc["points"]}
    assert status == {"fedavg__s0": "failed", "fedavg__s1": "finished", "psfl__s0": "finished", "psfl__s1": "finished"}
    failed = next(p for p in doc["points"] if p["label"] == "fedavg__s0")
    assert "simulated crash" in failed["error"]
    assert (out / "fedavg__s0" / "checkpoint" / "state.pt").is_file()
    assert not (out / "fedavg__s0" / "report.html").exists()

    # 2nd: only the crashed point runs, resumed from its checkpoint
    calls = []
    execute = Runner.execute

    def counting(self):
        calls.append((self.out.name, self.resume))
        return execute(self)

    monkeypatch.setattr(Runner, "execute", counting)
    assert main(args + ["--no-compare"]) == 0  # the comparison of the finished sweep: the 3rd call's
    assert calls == [("fedavg__s0", True)]
    doc = json.loads((out / "sweep.json").read_text())
    assert {p["label"]: (p["state"], p["status"]) for p in doc["points"]} == {
        "fedavg__s0": ("resume", "finished"), "fedavg__s1": ("done", "skipped"),
        "psfl__s0": ("done", "skipped"), "psfl__s1": ("done", "skipped")}
    rows = read_jsonl(out / "fedavg__s0" / "metrics.jsonl")
    assert [r["round"] for r in rows if r["scope"] == "global"] == [0, 1, 2]

    # 3rd: everything is finished: the runner is never called
    calls.clear()
    assert main(args) == 0
    assert calls == []

    for name in ("report.html", "summary.json", "summary.md", "figures/compare_curves.png",
                 "figures/compare_user_accuracy.png", "figures/compare_uplink_energy.png",
                 "figures/compare_accuracy_energy.png", "figures/compare_mentor_student.png"):
        assert (out / name).is_file(), name
    for label in status:
        assert (out / label / "report.html").is_file()

    # summary numbers are the means over seeds of numbers read straight from metrics.jsonl
    summary = json.loads((out / "summary.json").read_text())["groups"]
    assert set(summary) == {"fedavg", "psfl"}
    # each group states what it trained on, and how many runs passed the convergence test (2 rounds: none)
    assert summary["fedavg"]["objective"] == "mse | sgd lr=0.05" and summary["fedavg"]["converged"] == "0/2"
    assert summary["psfl"]["objective"].startswith("mse + 1*CE(classifier) + 1*KL")
    assert "| 0/2 | mse \\| sgd lr=0.05 |" in (out / "summary.md").read_text()
    for group in ("fedavg", "psfl"):
        runs = [read_jsonl(out / f"{group}__s{s}" / "metrics.jsonl") for s in (0, 1)]
        final_acc = [[r for r in rows if r["scope"] == "global"][-1]["accuracy"] for rows in runs]
        up_bits = [sum(r["uplink_bits"] for r in rows if r["scope"] == "link") for rows in runs]
        energy = [sum(r["uplink_energy_j"] + r["downlink_energy_j"] for r in rows if r["scope"] == "link")
                  for rows in runs]
        assert summary[group]["final_accuracy"]["mean"] == pytest.approx(np.mean(final_acc))
        assert summary[group]["final_accuracy"]["std"] == pytest.approx(np.std(final_acc, ddof=1))
        assert summary[group]["total_uplink_bits"]["mean"] == pytest.approx(np.mean(up_bits))
        assert summary[group]["total_energy_j"]["mean"] == pytest.approx(np.mean(energy))
        users_last = [r for r in runs[0] if r["scope"] == "user" and r["round"] == 2 and "mentor_loss" in r]
        if group == "psfl":  # Figs 9-10 in the table: users' mean mentor / student loss at the last round
            assert summary[group]["final_mentor_loss"]["values"][0] == pytest.approx(
                np.mean([r["mentor_loss"] for r in users_last]))
        else:
            assert summary[group]["final_mentor_loss"]["mean"] is None
        # per-round totals in the global rows agree with the link rows
        assert sum(r["uplink_bits"] for r in runs[0] if r["scope"] == "global" and r["round"] > 0) == up_bits[0]

    # the library pieces and `semfl compare` on the same folder
    groups = group_runs(load_runs([out]))
    assert {k: sorted(r.seed for r in v) for k, v in groups.items()} == {"fedavg": [0, 1], "psfl": [0, 1]}
    final_ssim = [[r for r in read_jsonl(out / f"psfl__s{s}" / "metrics.jsonl") if r["scope"] == "global"][-1]["ssim"]
                  for s in (0, 1)]
    assert summarise(groups)["psfl"]["final_ssim"]["mean"] == pytest.approx(np.mean(final_ssim))
    assert summary["psfl"]["final_ssim"]["mean"] == pytest.approx(np.mean(final_ssim))
    # a sweep folder and one of its own runs: that run is still one seed
    again = group_runs(load_runs([out, out / "psfl__s0"]))
    assert {k: sorted(r.seed for r in v) for k, v in again.items()} == {"fedavg": [0, 1], "psfl": [0, 1]}
    # the seeds of Flower runs group too: `semfl deploy local` and `flwr run` name them differently
    flower = tmp_path / "flower"
    for seed in (0, 1):
        for name in (f"quickstart-psfl-s{seed}-flower", f"psfl-fashion-mnist-seed{seed}"):
            shutil.copytree(out / f"psfl__s{seed}", flower / name)
    named = group_runs(load_runs([flower]))
    assert {k: sorted(r.seed for r in v) for k, v in named.items()} == {
        "quickstart-psfl-flower": [0, 1], "psfl-fashion-mnist": [0, 1]}
    # `semfl report` on a path that holds no run: an error, and no folder or empty report left behind
    assert main(["report", str(tmp_path / "no-such-run")]) == 2
    assert not (tmp_path / "no-such-run").exists()
    other = tmp_path / "cmp"
    assert main(["compare", str(out / "psfl__s0"), str(out / "fedavg__s1"), "--out", str(other)]) == 0
    assert (other / "report.html").is_file()
    assert set(json.loads((other / "summary.json").read_text())["groups"]) == {"psfl", "fedavg"}
    table = (out / "summary.md").read_text()
    assert "mentor loss (mean over users)" in table and "nearest-prototype accuracy" not in table


def test_invalid_point_is_recorded_and_others_complete(tmp_path, tiny_overrides, capsys):
    path = write(tmp_path / "sweep.toml", """
[sweep]
name = "broken"
seed = [0]
[sweep.variants]
"good" = ["method=fedavg"]
"bad" = ["method=fedavg", "train.momentum=2.0"]
""")
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--dry-run", "--out", str(out)] + sets(tiny_overrides)) == 1
    assert "train.momentum" in capsys.readouterr().out
    assert main(["sweep", str(path), "--quiet", "--out", str(out)] + sets(tiny_overrides + ["rounds=1"])) == 1
    doc = json.loads((out / "sweep.json").read_text())
    points = {p["label"]: p for p in doc["points"]}
    assert points["good__s0"]["status"] == "finished"
    assert points["bad__s0"]["status"] == "failed" and "train.momentum" in points["bad__s0"]["error"]
    assert (out / "good__s0" / "report.html").is_file() and (out / "report.html").is_file()


def test_a_sweep_with_no_valid_point_is_one_error_before_anything_is_written(tmp_path, tiny_overrides, capsys):
    path = write(tmp_path / "sweep.toml", """
[sweep]
name = "typo"
method = ["fedavg"]
"train.lrr" = [0.1, 0.2]
""")
    for dry in ([], ["--dry-run"]):
        assert main(["sweep", str(path), "--quiet", "--out", str(tmp_path / "out"), *dry] + sets(tiny_overrides)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no point of the sweep is valid" in err and "train.lrr: unknown key" in err
        assert "from the sweep's axis sweep.train.lrr" in err
        assert not (tmp_path / "out").exists()


def test_a_set_of_an_axis_key_is_refused_and_points_to_the_axis(tmp_path, tiny_overrides, capsys):
    """`--set seed=3` on a sweep over seeds would run seed 3 in every point under the labels s0, s1
    (and `--set method=...` every method's point as one method): refused, naming the axis override."""
    path = write(tmp_path / "sweep.toml", """
[sweep]
name = "axes"
method = ["fedavg", "local"]
seed = [0, 1]
"train.momentum" = [0.0, 0.5]
[sweep.variants]
"fedavg-small" = ["method=fedavg", "train.batch_size=8"]
""")
    base = ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out")] + sets(tiny_overrides)
    for bad, axis in ((["--set", "seed=3"], "seed"), (["--set", "method=psfl"], "method"),
                      (["--set", "train.momentum=0.9"], "train.momentum"),
                      (["--set", "train={momentum=0.9}"], "train.momentum")):
        assert main(base + bad) == 2
        err = capsys.readouterr().err.strip()
        assert f"{axis} is an axis of this sweep" in err and f"--set sweep.{axis}=[...]" in err
    assert main(base + ["--set", "train.batch_size=4"]) == 2  # what a variant sets, under the variant's name
    assert "the sweep's variant 'fedavg-small' sets train.batch_size itself" in capsys.readouterr().err
    assert main(base + ["--set", "sweep.seed=3"]) == 2
    assert "got 3 (a list: seed = [3] in the file, --set sweep.seed=[3] on the command line)" in capsys.readouterr().err
    assert main(base + ["--set", "sweep.seed=[3]"]) == 0
    assert "fedavg__momentum0.5__s3: seed=3" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_parallel_jobs_match_sequential_and_record_failures(tmp_path, tiny_overrides):
    path = write(tmp_path / "sweep.toml", """
[sweep]
name = "jobs"
seed = [0, 1]
[sweep.variants]
"fedavg" = ["method=fedavg"]
"bad" = ["method=psfl", "foundation.samples=100000"]  # fails inside the worker, at mentor set-up
""")
    overrides = tiny_overrides + ["users=2", "rounds=2", "eval.snr_sweep=[]", "eval.grid_images=0",
                                  "data.max_per_user=32", "data.test_samples=50"]  # small points: the processes are tested
    # same thread count on both sides: metrics are bit-identical only for equal thread counts
    base = ["sweep", str(path), "--quiet", "--no-compare"] + sets(overrides + ["train.vmap=off"])
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        assert main(base + ["--out", str(tmp_path / "seq")]) == 1
    finally:
        torch.set_num_threads(threads)
    assert main(base + ["--out", str(tmp_path / "par"), "--jobs", "2"]) == 1
    doc = json.loads((tmp_path / "par" / "sweep.json").read_text())
    status = {p["label"]: p["status"] for p in doc["points"]}
    assert status == {"fedavg__s0": "finished", "fedavg__s1": "finished", "bad__s0": "failed", "bad__s1": "failed"}
    assert all(p["wall_s"] > 0 for p in doc["points"] if p["status"] == "finished")
    bad = next(p for p in doc["points"] if p["label"] == "bad__s0")
    assert "foundation.samples: 100000 requested" in bad["error"]
    assert "Traceback" in (tmp_path / "par" / "bad__s0" / "sweep_error.txt").read_text()
    for label in ("fedavg__s0", "fedavg__s1"):
        def quality(root):
            return [(r["round"], r["loss"], r["psnr_db"]) for r in read_jsonl(root / label / "metrics.jsonl")
                    if r["scope"] == "global"]
        assert quality(tmp_path / "par") == quality(tmp_path / "seq")
    assert main(["sweep", str(path), "--jobs", "0"]) == 2


@pytest.mark.parametrize("path", sorted(str(p.relative_to(CONFIGS.parent)) for p in CONFIGS.parent.rglob("*.toml")))
def test_every_shipped_config_and_sweep_loads(path):
    """Every TOML under configs/ is a valid config, a sweep whose every point is one, or a claims file."""
    import tomllib

    from semfl.experiments.claims import load_claims

    file = CONFIGS.parent / path
    if file.parent.name == "claims":
        assert load_claims(file).claims
    elif "sweep" in tomllib.loads(file.read_text()):
        sweep = load_sweep(file)
        assert sweep.points and all(point.config() for point in sweep.points)
    else:
        assert load_config(file, [])
