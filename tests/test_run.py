"""End-to-end runs: run directory contract, improvement, determinism, resume after a kill, CLI errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from semfl.cli import main
from semfl.config import load_config
from semfl.files import read_jsonl
from semfl.runtimes.local import LocalTransport
from semfl.runtimes.run import Runner
from conftest import assert_kept, lines_before

# the tests that compare with the default tiny run share it (default_run): one worker makes it once
pytestmark = pytest.mark.xdist_group("run-default-tiny")

REQUIRED_LINK = ("uplink_bits", "downlink_bits", "uplink_energy_j", "downlink_energy_j", "uplink_delay_s", "snr_db")


def stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def run(overrides: list[str], out: Path, resume: bool = False) -> list[dict]:
    cfg = load_config(None, overrides)
    Runner(cfg, out, resume=resume, show_progress=False, log=lambda m: None).execute()
    return read_jsonl(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """default_run(overrides) -> the stable rows of one run of ``overrides`` (tiny_overrides), made once
    per module (and worker) whichever test asks first."""
    made: dict[tuple, list[dict]] = {}

    def get(overrides: list[str]) -> list[dict]:
        if tuple(overrides) not in made:
            made[tuple(overrides)] = stable(run(overrides, tmp_path_factory.mktemp("default") / "run"))
        return made[tuple(overrides)]
    return get


def test_run_directory_and_metrics_contract(tiny_overrides, tmp_path):
    out = tmp_path / "run"
    rows = run(tiny_overrides + ["rounds=2", "log.figures=true"], out)
    for name in ("config.toml", "metrics.jsonl", "partition.json", "checkpoint/state.pt", "report.html",
                 "figures/global_metrics.png", "figures/link_per_round.png", "figures/reconstructions.png",
                 "figures/snr_sweep.png", "figures/partition.png"):
        assert (out / name).is_file(), name
    assert all({"round", "method", "scope"} <= set(r) for r in rows)
    globals_ = [r for r in rows if r["scope"] == "global"]
    assert [r["round"] for r in globals_] == [0, 1, 2]
    for key in ("loss", "accuracy", "psnr_db", "ssim"):
        assert all(key in r for r in globals_)
    links = [r for r in rows if r["scope"] == "link"]
    assert len(links) == 2 * 3
    assert all(set(REQUIRED_LINK) <= set(r) for r in links)
    # the same dense model goes down to every user each round: downlink bits are identical
    assert len({r["downlink_bits"] for r in links}) == 1
    partition = json.loads((out / "partition.json").read_text())
    assert sum(map(sum, partition["class_histogram"])) == sum(partition["sizes"])
    assert "<img" in (out / "report.html").read_text()
    # log.figures = false: the same metrics and report tables, no figure drawn
    bare = tmp_path / "bare"
    assert stable(run(tiny_overrides + ["rounds=2", "log.figures=false"], bare)) == stable(rows)
    assert not (bare / "figures").exists() or not list((bare / "figures").glob("*.png"))
    report = (bare / "report.html").read_text()
    assert "<img" not in report and "not drawn (log.figures = false)" in report and "Global metrics per round" in report


def test_fedavg_improves(tiny_overrides, tmp_path):
    # measured: 7.2 dB at round 0, 10.3 dB after 3 rounds of 2 local epochs
    rows = run(tiny_overrides + ["rounds=3", "train.local_epochs=2"], tmp_path / "run")
    globals_ = [r for r in rows if r["scope"] == "global"]
    assert globals_[-1]["psnr_db"] > globals_[0]["psnr_db"] + 1.0
    assert globals_[-1]["loss"] < globals_[0]["loss"]


def test_same_seed_same_metrics_other_seed_differs(tiny_overrides, tmp_path, default_run):
    a = default_run(tiny_overrides)
    b = stable(run(tiny_overrides, tmp_path / "b"))
    c = stable(run(tiny_overrides + ["seed=1"], tmp_path / "c"))
    assert a == b
    assert a != c


def test_resume_after_kill_matches_uninterrupted(tiny_overrides, tmp_path, monkeypatch, default_run):
    reference = default_run(tiny_overrides)
    original = LocalTransport.send
    calls = {"n": 0}

    def dying_send(self, users, kind, payload, on_reply=None):
        if self.round == 2:
            calls["n"] += 1
            users = list(users)

            def die_after_first(user, reply):
                on_reply(user, reply)
                raise KeyboardInterrupt  # killed mid-round, after one user answered

            return original(self, users, kind, payload, on_reply=die_after_first)
        return original(self, users, kind, payload, on_reply)

    monkeypatch.setattr(LocalTransport, "send", dying_send)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_overrides, tmp_path / "killed")
    monkeypatch.setattr(LocalTransport, "send", original)
    assert calls["n"] == 1
    done = lines_before(tmp_path / "killed", 2)
    resumed = stable(run(tiny_overrides, tmp_path / "killed", resume=True))
    assert resumed == reference
    assert_kept(tmp_path / "killed", done)


def test_existing_run_needs_resume_and_same_config(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_overrides + ["rounds=1"], out)
    args = ["run", "--quiet", "--out", str(out)] + sum((["--set", o] for o in tiny_overrides + ["rounds=1"]), [])
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    changed = ["run", "--quiet", "--resume", "--out", str(out)] + sum((["--set", o] for o in tiny_overrides + ["rounds=2", "train.lr=0.2"]), [])
    assert main(changed) == 2
    assert "config differs" in capsys.readouterr().err


def test_participation_samples_users(tiny_overrides, tmp_path):
    rows = run(tiny_overrides + ["users=4", "train.participation=0.5"], tmp_path / "run")
    per_round = {}
    for r in rows:
        if r["scope"] == "link":
            per_round.setdefault(r["round"], set()).add(r["user"])
    assert all(len(u) == 2 for u in per_round.values())
    assert len({frozenset(u) for u in per_round.values()}) > 1


def test_a_damaged_run_is_refused_by_resume_and_report_and_left_as_it_was(finished_run, tmp_path, capsys):
    """A metrics file damaged other than by a torn last line, a row without its round, an unreadable
    checkpoint: --resume and `semfl report` stop with one line naming the file (exit 2) and leave the
    run as it was; a last line torn by a crash while it was appended is what a resume expects."""
    import shutil

    source = finished_run("fedavg")
    lines = (source / "metrics.jsonl").read_text().splitlines()
    no_round = json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "round"})
    damages = {  # name: (metrics lines, checkpoint bytes, the error)
        "middle line cut": (lines[:2] + [lines[2][:15]] + lines[3:], None, "line 3 is not a JSON object"),
        "an array": (lines[:1] + ["[1, 2]"] + lines[2:], None, "line 2 is not a JSON object"),
        "no round": (lines[:1] + [no_round] + lines[2:], None, "row 2 has no integer 'round'"),
        "checkpoint cut": (lines, b"PK\x03", "checkpoint .* is unreadable"),
    }
    for name, (damaged, checkpoint, error) in damages.items():
        run_dir = tmp_path / name.replace(" ", "-")
        shutil.copytree(source, run_dir)
        (run_dir / "metrics.jsonl").write_text("\n".join(damaged) + "\n")
        if checkpoint is not None:
            (run_dir / "checkpoint" / "state.pt").write_bytes(checkpoint)
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        commands = [["run", "--quiet", "--resume", "--out", str(run_dir), str(run_dir / "config.toml")]]
        if name not in ("checkpoint cut", "no round"):  # the report reads no checkpoint, nor needs rounds
            commands.append(["report", str(run_dir)])
        for command in commands:
            assert main(command) == 2, (name, command[0])
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and re.search(error, err), err
            assert str(run_dir / ("checkpoint/state.pt" if checkpoint else "metrics.jsonl")) in err
            assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before, (name, command[0])
    torn = tmp_path / "torn"
    shutil.copytree(source, torn)
    (torn / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:12])
    assert read_jsonl(torn / "metrics.jsonl") == read_jsonl(source / "metrics.jsonl")
    assert main(["run", "--quiet", "--resume", "--out", str(torn)]) == 0  # no config given: the run's own
    assert [(r["round"], r["scope"]) for r in read_jsonl(torn / "metrics.jsonl")] == \
        [(r["round"], r["scope"]) for r in read_jsonl(source / "metrics.jsonl")]
