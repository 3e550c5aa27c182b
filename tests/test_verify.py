"""Claims files, `semfl verify` and the claims section of `semfl compare`, on run directories written here."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from semfl.cli import main
from semfl.config import ConfigError, dump_config
from semfl.experiments.claims import load_claims, measure
from semfl.experiments.verify import plan_studies
from semfl.experiments.compare import RunData, load_run
from semfl.protocol.checkpoint import save_checkpoint
from semfl.experiments.sweep import load_sweep

ROOT = Path(__file__).resolve().parent.parent
T4 = 2.7764451051977987  # t_{0.975, 4}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


SWEEP = """
method = "fedavg"
rounds = 2
users = 2
[sweep]
name = "toy"
method = ["fedavg", "psfl"]
"data.dirichlet_alpha" = [0.1, 0.9]
seed = [0]
"""

CLAIMS = """
paper = "toy"
[seeds]
tuning = [0]
reporting = [100, 101, 102, 103, 104]

[[claims]]
id = "psfl-above-fedavg"
text = "PSFL beats FedAvg at r = 0.9"
sweep = "sweep.toml"
metric = "accuracy"
groups = ["psfl__alpha0.9", "fedavg__alpha0.9"]
direction = "greater"
differs = "a toy"

[[claims]]
id = "energy"
text = "PSFL spends less uplink energy"
sweep = "sweep.toml"
metric = "uplink_energy_j"
scope = "link_total"
groups = ["psfl__alpha0.9", "fedavg__alpha0.9"]
direction = "less"

[[claims]]
id = "rises"
text = "FedAvg's loss at round 2 is below round 0 (r = 0.1)"
sweep = "sweep.toml"
metric = "loss"
at = [2, 0]
groups = ["fedavg__alpha0.1", "fedavg__alpha0.1"]
direction = "less"

[[claims]]
id = "fedavg-above-psfl"
text = "FedAvg beats PSFL at r = 0.9 (the toy runs say the opposite)"
sweep = "sweep.toml"
metric = "accuracy"
groups = ["fedavg__alpha0.9", "psfl__alpha0.9"]
direction = "greater"

[[claims]]
id = "psfl-above-0.55"
text = "PSFL's accuracy at r = 0.9 is above 0.55"
sweep = "sweep.toml"
metric = "accuracy"
groups = ["psfl__alpha0.9"]
than = 0.55
direction = "greater"

[[claims]]
id = "ceiling"
text = "the centralised bound is above PSFL"
sweep = "sweep.toml"
metric = "accuracy"
groups = ["centralised", "psfl__alpha0.9"]
direction = "greater"
"""

# final accuracy per (variant, alpha) and seed: PSFL - FedAvg at r = 0.9 is 0.1, 0.12, 0.08, 0.11, 0.09
ACC = {("fedavg", 0.9): [0.5, 0.5, 0.5, 0.5, 0.5], ("psfl", 0.9): [0.6, 0.62, 0.58, 0.61, 0.59],
       ("fedavg", 0.1): [0.4] * 5, ("psfl", 0.1): [0.45] * 5}


def fake_run(run_dir: Path, cfg, accuracy: float, energy_per_user: float, losses=(2.0, 1.5, 1.0)) -> None:
    """A finished run directory as the runner leaves it: resolved config, metrics, checkpoint, report."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(dump_config(cfg))
    rows = []
    for r, loss in enumerate(losses):
        rows.append({"round": r, "method": cfg.method, "scope": "global", "loss": loss,
                     "accuracy": accuracy if r == len(losses) - 1 else 0.1, "wall_s": 10.0 * r})
        if r:
            rows += [{"round": r, "method": cfg.method, "scope": "link", "user": u, "uplink_energy_j": energy_per_user}
                     for u in range(cfg.users)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    save_checkpoint(run_dir / "checkpoint" / "state.pt", {"round": cfg.rounds})
    (run_dir / "report.html").write_text("<html></html>")


@pytest.fixture
def toy(tmp_path):
    sweep_file = write(tmp_path / "claims" / "sweep.toml", SWEEP)
    claims_file = write(tmp_path / "claims" / "toy.toml", CLAIMS)
    runs = tmp_path / "runs"
    sweep = load_sweep(sweep_file, ["sweep.seed=[100, 101, 102, 103, 104]"])
    for point in sweep.points:
        seed = point.values["seed"]
        key = (point.variant, point.values["data.dirichlet_alpha"])
        if key == ("fedavg", 0.9) and seed == 104:
            continue  # an unfinished run: that seed is left out of the pairs
        energy = 1.0 if point.variant == "psfl" else 3.0 + 0.1 * (seed - 100)
        fake_run(runs / "toy" / point.label, point.config(), ACC[key][seed - 100], energy)
    return claims_file, runs


def test_verify_reads_runs_and_gives_intervals_and_verdicts(toy, tmp_path, capsys):
    claims_file, runs = toy
    assert main(["verify", str(claims_file), "--runs", str(runs)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((runs / "verdicts.json").read_text())
    by_id = {c["id"]: c for c in doc["claims"]}
    acc = by_id["psfl-above-fedavg"]
    # seed 104 of fedavg did not finish: 4 pairs, diffs 0.10 0.12 0.08 0.11 -> t with 3 dof
    assert acc["seeds"] == [100, 101, 102, 103]
    assert acc["diffs"] == pytest.approx([0.1, 0.12, 0.08, 0.11])
    mean = (0.1 + 0.12 + 0.08 + 0.11) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in (0.1, 0.12, 0.08, 0.11)) / 3)
    half = 3.182446305284263 * sd / 2  # t_{0.975, 3} = 3.182
    assert acc["mean"] == pytest.approx(mean) and acc["ci95"] == pytest.approx([mean - half, mean + half])
    assert acc["verdict"] == "holds"
    assert any("fedavg__alpha0.9: no finished run for seeds [104]" in n for n in acc["notes"])
    # link_total: PSFL 2 users x 2 rounds x 1 J = 4 J against FedAvg 4 x (3 + 0.1 k) J
    energy = by_id["energy"]
    assert energy["a"] == pytest.approx([4.0] * 4) and energy["b"] == pytest.approx([12.0, 12.4, 12.8, 13.2])
    assert energy["verdict"] == "holds"
    # per-side rounds: loss 1.0 at round 2 against 2.0 at round 0, every seed: a point interval below 0
    rises = by_id["rises"]
    assert rises["seeds"] == [100, 101, 102, 103, 104] and rises["ci95"] == pytest.approx([-1.0, -1.0])
    assert rises["verdict"] == "holds"
    # the same pairs the other way round: an interval wholly below 0 reverses the claim
    opposite = by_id["fedavg-above-psfl"]
    assert opposite["mean"] == pytest.approx(-mean) and opposite["ci95"] == pytest.approx([-mean - half, -mean + half])
    assert opposite["verdict"] == "reversed"
    # one group against a constant: all 5 PSFL seeds, diffs 0.05 0.07 0.03 0.06 0.04 -> t with 4 dof
    constant = by_id["psfl-above-0.55"]
    assert constant["seeds"] == [100, 101, 102, 103, 104]
    assert constant["diffs"] == pytest.approx([0.05, 0.07, 0.03, 0.06, 0.04])
    half5 = T4 * math.sqrt(0.001 / 4) / math.sqrt(5)
    assert constant["ci95"] == pytest.approx([0.05 - half5, 0.05 + half5]) and constant["verdict"] == "holds"
    # a bound the sweep does not have yet: reported, not fatal
    assert by_id["ceiling"]["verdict"] == "not run" and "centralised" in by_id["ceiling"]["notes"][0]
    assert doc["seeds"] == [100, 101, 102, 103, 104] and doc["tuning_seeds"] == [0]
    table = (runs / "verdicts.md").read_text()
    assert table in printed
    assert "| `psfl-above-fedavg`: PSFL beats FedAvg at r = 0.9 | accuracy(psfl__alpha0.9) − accuracy(fedavg__alpha0.9) > 0 |" in table
    assert f"{mean:.4g} [{mean - half:.4g}, {mean + half:.4g}] | **holds** |" in table
    assert "- `psfl-above-fedavg`: a toy" in table and "Wall time:" in table
    assert "Runs: 14 of the 15 the claims need had finished (`--run-missing` runs the others)." in table
    assert "| accuracy(fedavg__alpha0.9) − accuracy(psfl__alpha0.9) > 0 |" in table and "**reversed**" in table
    assert "| accuracy(psfl__alpha0.9) − 0.55 > 0 |" in table


def test_verify_tables_each_group_with_its_start_objective_and_interval(toy):
    claims_file, runs = toy
    assert main(["verify", str(claims_file), "--runs", str(runs)]) == 0
    doc = json.loads((runs / "verdicts.json").read_text())
    groups = {g["group"]: g for g in doc["groups"]}
    # the groups the claims name, in order; a group the sweep lacks (centralised) has no row
    assert list(groups) == ["psfl__alpha0.9", "fedavg__alpha0.9", "fedavg__alpha0.1"]
    psfl = groups["psfl__alpha0.9"]
    assert psfl["seeds"] == [100, 101, 102, 103, 104] and psfl["method"] == "psfl"
    xs = ACC[("psfl", 0.9)]
    mean = sum(xs) / 5
    half = 2.7764451051977987 * math.sqrt(sum((x - mean) ** 2 for x in xs) / 4) / math.sqrt(5)  # t_{0.975, 4}
    assert psfl["accuracy"] == pytest.approx([mean, mean - half, mean + half])
    assert psfl["uplink_energy_j"] == pytest.approx([4.0, 4.0, 4.0])  # 2 users x 2 rounds x 1 J, every seed
    fedavg = groups["fedavg__alpha0.9"]
    assert fedavg["seeds"] == [100, 101, 102, 103] and fedavg["start"] == "scratch" and fedavg["converged"] == 0
    table = (runs / "verdicts.md").read_text()
    assert "#### The groups compared" in table
    assert f"| 5 (100, 101, 102, 103, 104) | {mean:.4g} [{mean - half:.4g}, {mean + half:.4g}] | 4 [4, 4] | 0 of 5 |" in table


def test_group_model_is_the_one_the_runs_summary_names(toy):
    """A run's summary.json names the model it trained (Method.model_name); older runs without it fall
    back to their config's model.arch."""
    claims_file, runs = toy
    for run_dir in (runs / "toy").glob("fedavg__alpha0.9__s*"):
        (run_dir / "summary.json").write_text(json.dumps({"model": "dcgan-s/m/l by data size"}))
    assert main(["verify", str(claims_file), "--runs", str(runs)]) == 0
    groups = {g["group"]: g for g in json.loads((runs / "verdicts.json").read_text())["groups"]}
    assert groups["fedavg__alpha0.9"]["arch"] == "dcgan-s/m/l by data size"
    assert groups["psfl__alpha0.9"]["arch"] == "csc"
    assert "| fedavg (dcgan-s/m/l by data size) |" in (runs / "verdicts.md").read_text()


def test_group_start_and_objective_cells():
    from semfl.experiments.stats import mean_interval
    from semfl.experiments.verify import _start, group_markdown

    assert _start({"method": "psfl", "foundation": {"samples": 5000}}) == "student: scratch; mentors: foundation"
    assert _start({"method": "psfl", "foundation": {"samples": 0}}) == "scratch"
    assert _start({"method": "fedavg", "foundation": {"samples": 5000, "global_model": True}}) == "foundation"
    assert _start({"method": "stc"}) == "scratch"
    assert mean_interval([0.5]) == (0.5, None, None) and mean_interval([]) == (None, None, None)
    assert mean_interval([1.0, float("nan"), 3.0])[0] == 2.0  # non-finite values are left out
    row = {"group": "psfl", "method": "psfl", "arch": "csc", "start": "scratch", "seeds": [1],
           "objective": "mse + 0.1*KL(a||b) | adam lr=0.002", "accuracy": (0.5, None, None),
           "uplink_energy_j": (None, None, None), "converged": 1}
    line = group_markdown([row]).splitlines()[-1]
    # the objective's own bars are escaped, so the row keeps its 8 cells
    assert line.count(" | ") == 7 and "KL(a\\|\\|b) \\| adam" in line and "| 0.5 | – | 1 of 1 |" in line


def test_verify_seeds_option_and_tuning_warning(toy, capsys):
    claims_file, runs = toy
    assert main(["verify", str(claims_file), "--runs", str(runs), "--seeds", "100", "--claims", "energy"]) == 0
    doc = json.loads((runs / "verdicts.json").read_text())
    assert [c["id"] for c in doc["claims"]] == ["energy"]
    assert doc["claims"][0]["verdict"] == "undecided" and "one paired seed" in " ".join(doc["claims"][0]["notes"])
    assert main(["verify", str(claims_file), "--runs", str(runs), "--seeds", "0", "--claims", "energy"]) == 0
    assert "Warning: seeds 0 are tuning seeds" in capsys.readouterr().out
    assert main(["verify", str(claims_file), "--runs", str(runs), "--seeds", "999", "--claims", "energy"]) == 0
    assert json.loads((runs / "verdicts.json").read_text())["claims"][0]["verdict"] == "not run"
    assert main(["verify", str(claims_file), "--runs", str(runs), "--claims", "nope"]) == 2
    # runs made at other overrides are not read as these: the note says why
    assert main(["verify", str(claims_file), "--runs", str(runs), "--claims", "energy", "--set", "rounds=3"]) == 0
    claim = json.loads((runs / "verdicts.json").read_text())["claims"][0]
    assert claim["verdict"] == "not run" and "holds a run with a different config" in " ".join(claim["notes"])


def test_verify_runs_missing_points_through_the_sweep(tmp_path, tiny_overrides):
    sweep = write(tmp_path / "c" / "sweep.toml", '[sweep]\nname = "real"\nmethod = ["fedavg", "stc"]\nseed = [0]\n')
    claims = write(tmp_path / "c" / "real.toml", """
paper = "real"
[seeds]
tuning = [0]
reporting = [1, 2]
[[claims]]
id = "fedavg-loss-below-stc"
text = "t"
sweep = "sweep.toml"
metric = "loss"
groups = ["fedavg", "stc"]
direction = "less"
""")
    runs = tmp_path / "runs"
    args = ["verify", str(claims), "--runs", str(runs), "--run-missing"]
    args += sum((["--set", s] for s in tiny_overrides + ["users=2", "rounds=1", "eval.snr_sweep=[]",
                                                       "data.max_per_user=32", "data.test_samples=50", "classifier.epochs=1"]), [])
    assert main(args) == 0
    assert sorted(p.name for p in (runs / "real").iterdir() if p.is_dir()) == ["fedavg__s1", "fedavg__s2",
                                                                                "stc__s1", "stc__s2"]
    doc = json.loads((runs / "verdicts.json").read_text())
    claim = doc["claims"][0]
    a = [load_run(runs / "real" / f"fedavg__s{s}").final("loss") for s in (1, 2)]
    b = [load_run(runs / "real" / f"stc__s{s}").final("loss") for s in (1, 2)]
    assert claim["seeds"] == [1, 2] and claim["a"] == pytest.approx(a) and claim["b"] == pytest.approx(b)
    assert sweep.is_file() and doc["runs_wall_s"] > 0


def test_an_override_no_run_can_take_is_one_error_and_no_verdicts(toy, capsys):
    claims_file, runs = toy
    assert main(["verify", str(claims_file), "--runs", str(runs), "--set", "train.lrr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no run the claims need is valid" in err and "train.lrr: unknown key" in err
    assert not (runs / "verdicts.md").exists() and not (runs / "verdicts.json").exists()


def test_compare_reports_claims(toy, tmp_path):
    claims_file, runs = toy
    out = tmp_path / "cmp"
    assert main(["compare", str(runs / "toy"), "--out", str(out), "--claims", str(claims_file)]) == 0
    summary = (out / "summary.md").read_text()
    assert "psfl-above-fedavg" in summary and "**holds**" in summary
    doc = json.loads((out / "summary.json").read_text())
    verdicts = {c["id"]: c["verdict"] for c in doc["claims"]}
    assert verdicts == {"psfl-above-fedavg": "holds", "energy": "holds", "rises": "holds", "fedavg-above-psfl": "reversed",
                        "psfl-above-0.55": "holds", "ceiling": "not run"}
    assert "psfl-above-fedavg" in (out / "report.html").read_text()


def _claims_text(**change) -> str:
    claim = {"id": '"c"', "text": '"t"', "sweep": '"sweep.toml"', "metric": '"accuracy"',
             "groups": '["psfl__alpha0.9", "fedavg__alpha0.9"]', "direction": '"greater"'}
    claim.update(change)
    body = "".join(f"{k} = {v}\n" for k, v in claim.items() if v is not None)
    return f'paper = "toy"\n[seeds]\ntuning = [0]\nreporting = [1, 2]\n[[claims]]\n{body}'


@pytest.mark.parametrize("change, field", [
    ({"direction": '"bigger"'}, "claims[0] (c).direction"),
    ({"metric": None}, "claims[0] (c).metric: missing"),
    ({"scope": '"users"'}, "claims[0] (c).scope"),
    ({"at": '"last"'}, "claims[0] (c).at"),
    ({"scope": '"link_total"', "at": "3"}, "claims[0] (c).at"),
    ({"groups": '["psfl"]'}, "claims[0] (c).than"),
    ({"than": "1.0"}, "claims[0] (c).than"),
    ({"groups": '["psfl", "psfl"]'}, "claims[0] (c).groups"),
    ({"sweep": '"missing.toml"'}, "claims[0] (c).sweep: no such file"),
    ({"seeds": "[0, 5]"}, "claims[0] (c).seeds"),
    ({"id": '"a b"'}, "claims[0] (a b).id"),
    ({"colour": '"red"'}, "claims[0] (c).colour: unknown key"),
])
def test_claim_errors_name_the_field(tmp_path, change, field):
    write(tmp_path / "sweep.toml", SWEEP)
    path = write(tmp_path / "bad.toml", _claims_text(**change))
    with pytest.raises(ConfigError) as err:
        load_claims(path)
    assert field in str(err.value) and str(path) in str(err.value)


def test_claims_file_level_errors(tmp_path):
    write(tmp_path / "sweep.toml", SWEEP)
    overlap = _claims_text().replace("reporting = [1, 2]", "reporting = [0, 1]")
    with pytest.raises(ConfigError, match=r"seeds.reporting: seeds \[0\] are also tuning seeds"):
        load_claims(write(tmp_path / "a.toml", overlap))
    with pytest.raises(ConfigError, match="claims.id: repeated ids"):
        load_claims(write(tmp_path / "b.toml", _claims_text() + _claims_text().split("[seeds]")[1].split("\n", 3)[3]))
    with pytest.raises(ConfigError, match="groups: 'psfl' matches several points"):
        plan_studies(load_claims(write(tmp_path / "c.toml", _claims_text(groups='["psfl", "fedavg__alpha0.9"]'))),
                     tmp_path / "runs")
    assert main(["verify", "no-such-paper"]) == 2


def test_measure_scopes_and_rounds():
    rows = [{"round": 0, "scope": "global", "loss": 3.0, "accuracy": 0.1},
            {"round": 1, "scope": "global", "loss": 1.0, "accuracy": 0.7},
            {"round": 2, "scope": "global", "loss": 2.0, "accuracy": 0.5},
            {"round": 1, "scope": "user", "user": 0, "mentor_loss": 1.0},
            {"round": 1, "scope": "user", "user": 1, "mentor_loss": 2.0},
            {"round": 2, "scope": "user", "user": 0, "mentor_loss": 0.5},
            {"round": 2, "scope": "user", "user": 1, "mentor_loss": 0.7},
            {"round": 1, "scope": "link", "user": 0, "uplink_bits": 10},
            {"round": 2, "scope": "link", "user": 1, "uplink_bits": 32}]
    run = RunData(path=Path("x"), config={}, rows=rows)
    assert measure(run, "accuracy", "global", "final") == 0.5
    assert measure(run, "accuracy", "global", "best") == 0.7  # rounds >= 1, maximum
    assert measure(run, "loss", "global", "best") == 1.0  # a loss: the minimum
    assert measure(run, "loss", "global", "mean") == 1.5 and measure(run, "loss", "global", 0) == 3.0
    assert measure(run, "mentor_loss", "user_mean", "final") == pytest.approx(0.6)
    assert measure(run, "mentor_loss", "user_mean", 1) == pytest.approx(1.5)
    assert measure(run, "uplink_bits", "link_total", "final") == 42
    assert measure(run, "psnr_db", "global", "final") is None


@pytest.mark.parametrize("paper", ["psfl", "fedcl", "fedsfr", "finefed"])
def test_shipped_claims_resolve_against_their_sweeps(paper, tmp_path):
    from semfl.methods import available_methods

    claim_file = load_claims(ROOT / "configs" / "claims" / f"{paper}.toml")
    assert len(claim_file.reporting_seeds) >= 5 and not set(claim_file.reporting_seeds) & set(claim_file.tuning_seeds)
    studies = plan_studies(claim_file, tmp_path)
    for study in studies:
        # every group names a point at every reporting seed; only the bounds may wait for their methods
        pending = {g for g in study.unmatched if g in ("centralised", "local") and g not in available_methods()}
        assert set(study.unmatched) == pending, study.unmatched
        for claim in study.claims:
            for group in set(claim.groups) - pending:
                assert sorted(s for g, s in study.points if g == group) == sorted(study.seeds), (claim.id, group)
        for point in study.sweep.points:
            point.config()  # each needed point is a valid config


def test_needed_points_run_seed_by_seed(toy):
    claims_file, runs = toy
    study = plan_studies(load_claims(claims_file), runs, only=["psfl-above-fedavg"])[0]
    assert [p.label for p in study.sweep.points][:4] == ["fedavg__alpha0.9__s100", "psfl__alpha0.9__s100",
                                                         "fedavg__alpha0.9__s101", "psfl__alpha0.9__s101"]
    assert len(study.sweep.points) == 10  # only the two groups the claim names, not the whole grid
