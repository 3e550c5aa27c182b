"""The command line explains itself: a light parser, help with defaults and choices, --version,
one-line user errors with exit status 2, aligned tables, `semfl config show`, files at the umask's
permissions."""
from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from semfl.cli import BENCH_PARTS, build_parser, main, static_method_names
from semfl.config import CORE_TABLES, Config, ConfigError, dump_config, field_doc, load_config, method_tables

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def test_parser_imports_nothing_heavy_and_help_is_fast():
    # CPU seconds of the child (imports included), not wall time: the test machine is shared
    script = ("import sys, time\nt = time.process_time()\nfrom semfl.cli import build_parser\n"
              "build_parser().format_help()\nprint(time.process_time() - t)\n"
              "heavy = [m for m in ('torch', 'sionna', 'flwr', 'matplotlib', 'semfl.methods', 'semfl.runtimes.run') "
              "if m in sys.modules]\nassert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1.0


def test_static_method_list_is_the_registry():
    from semfl.methods import available_methods

    assert static_method_names() == available_methods()


def test_bench_parts_listed_by_the_cli_are_the_benchmarks():
    from semfl.experiments.bench.bench import PARTS

    assert BENCH_PARTS == PARTS


def test_help_shows_defaults_choices_and_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "semfl run configs/smoke.toml" in text
    assert all(m in text for m in static_method_names())
    with pytest.raises(SystemExit):
        main(["models", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help text is wrapped
    assert "{tiny,cpu,paper,all}" in text and "(default: all)" in text and "fashion-mnist, mnist, cifar10" in text
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "MAE epochs (default: 5)" in " ".join(capsys.readouterr().out.split())


def test_every_argument_has_help():
    import argparse

    stack, seen = [build_parser()], 0
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
                assert all(c.help for c in action._choices_actions), p.prog
                continue
            seen += 1
            assert action.help, f"{p.prog}: {action.dest} has no help"
    assert seen > 50


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    from importlib.metadata import version

    assert capsys.readouterr().out.strip() == f"semfl {version('semfl')}"


@pytest.mark.parametrize("argv,message", [
    (["run", "--set", "users=0", "--dry-run"], "semfl: error: users: must be >= 1, got 0"),
    (["run", "--set", "train.vmap=maybe", "--dry-run"], "semfl: error: train.vmap: expected one of"),
    (["run", "configs/nope.toml", "--dry-run"], "semfl: error: config: no such file configs/nope.toml"),
    (["run", "configs/fedavg-quickstart.toml", "--set", "psfl.zeta_max=0.5", "--dry-run"],
     "semfl: error: psfl.zeta_max: belongs to method psfl, not to 'fedavg'"),
    (["config", "show", "--method", "nosuch"], "semfl: error: method: unknown method 'nosuch'"),
    (["models", "--dataset", "imagenet"], "semfl: error: unknown dataset 'imagenet'"),
    (["report", "configs"], "semfl: error: report: configs is not a run directory"),
    (["pretrain", "configs/fedavg-quickstart.toml"], "semfl: error: method: pretrain trains a PSFL mentor"),
])
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_usage_errors_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "configs/smoke.toml", "--jobs", "two"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("semfl: error: argument --jobs: invalid int value: 'two' "
                                       "(usage: semfl sweep --help)\n")


def test_a_value_error_of_a_command_is_one_line(monkeypatch, capsys):
    import semfl.models.catalogue as catalogue

    def bad(*_args):
        raise ValueError("scale: no such preset")

    monkeypatch.setattr(catalogue, "model_table", bad)
    assert main(["models"]) == 2
    assert capsys.readouterr().err == "semfl: error: scale: no such preset\n"


def test_models_takes_the_dataset_aliases_of_data_and_aligns_its_table(capsys):
    assert main(["models", "--dataset", "fmnist", "--scale", "tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["scale", "arch", "role", "parameters", "image"]
    # aligned: every row's parameter count ends in the column where the header "parameters" ends
    end = lines[0].index("parameters") + len("parameters")
    assert len(lines) > 3 and all(line[end - 1].isdigit() and line[end] == " " for line in lines[1:])
    assert all(line.endswith("1x28x28") for line in lines[1:])


def test_data_hints_name_the_flags_of_semfl_data(tmp_path, capsys):
    assert main(["data", "mnist", "--root", str(tmp_path), "--no-download"]) == 2
    err = capsys.readouterr().err
    assert "--root DIR" in err and "--set data.root" not in err and "--set data.download" not in err


def test_run_dry_run_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "configs/smoke.toml", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("would run: method fedavg on fashion-mnist, 3 users, 2 rounds, scale tiny")
    assert f"run directory: {out}" in text and not out.exists()


# ---------------------------------------------------------------- config show and tables per method

def test_every_config_field_has_a_meaning():
    classes = [Config] + [type(getattr(Config(), t)) for t in CORE_TABLES] + list(method_tables().values())
    missing = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
               if f.name != "methods" and not dataclasses.is_dataclass(f.type) and f.name not in CORE_TABLES
               and not field_doc(f)]
    assert not missing


def test_config_show_lists_the_core_and_the_method_tables(capsys):
    assert main(["config", "show", "configs/quickstart.toml", "--set", "rounds=3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("method psfl: the core tables and [psfl], [foundation]")
    rows = {line.split()[0].lstrip("*"): line for line in out.splitlines() if line.startswith((" ", " *"))}
    assert rows["rounds"].startswith(" *rounds") and " 3 " in rows["rounds"] and "(default 10)" in rows["rounds"]
    assert "upper clip of the pruned fraction" in rows["psfl.zeta_max"]
    assert "train.lr" in rows and "engine.workers" in rows and not any(k.startswith("stc.") for k in rows)
    assert "log.checkpoint_every" in rows and "log.mlflow_uri" in rows  # every core table, [log] too
    assert main(["config", "show", "--method", "fedproto", "--json"]) == 0
    import json

    tables = {r["table"] for r in json.loads(capsys.readouterr().out)}
    assert tables == {"", *CORE_TABLES, "fedcl", "fedproto"}


def test_a_runs_config_holds_only_its_methods_tables():
    text = dump_config(load_config("configs/quickstart.toml"))
    assert "[psfl]" in text and "[foundation]" in text and "[stc]" not in text and "[fedcl]" not in text
    assert "[stc]" in dump_config(load_config(None, ["method=stc"]))


def test_a_table_shared_by_several_methods_names_them_all():
    with pytest.raises(ConfigError, match=r"^fedcl\.lam: belongs to methods fedcl, fedavg-split, fedproto, "
                                          r"not to 'psfl'"):
        load_config(None, ["method=psfl", "fedcl.lam=0.1"])
    assert load_config(None, ["method=fedproto", "fedcl.lam=0.1"]).table("fedcl").lam == 0.1


def test_an_old_run_config_with_every_table_still_resumes(tmp_path):
    import tomli_w

    raw = load_config(None, ["method=fedavg"]).to_dict()
    raw["psfl"] = {"zeta_max": 0.5}  # written before configs held only their method's tables
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError):
        load_config(path)
    assert dump_config(load_config(path, foreign="drop")) == dump_config(load_config(None, ["method=fedavg"]))


# ---------------------------------------------------------------- files

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    from semfl.files import atomic_text

    old = os.umask(umask)
    try:
        atomic_text(tmp_path / "a.toml", "x = 1\n")
        with open(tmp_path / "b.jsonl", "w") as handle:
            handle.write("{}\n")
    finally:
        os.umask(old)
    mode_atomic = stat.S_IMODE((tmp_path / "a.toml").stat().st_mode)
    assert mode_atomic == stat.S_IMODE((tmp_path / "b.jsonl").stat().st_mode) == 0o666 & ~umask


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    import torch

    from semfl.files import atomic_text, atomic_write
    from semfl.protocol.checkpoint import load_checkpoint, save_checkpoint

    target = tmp_path / "summary.json"
    atomic_text(target, "old")

    def killed_halfway(handle):
        handle.write(b"new, half writ")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, killed_halfway)
    assert target.read_text() == "old"
    checkpoint = tmp_path / "checkpoint" / "state.pt"
    save_checkpoint(checkpoint, {"round": 1, "w": torch.ones(3)})
    with pytest.raises(RuntimeError, match="cannot pickle"):  # fails after torch.save began writing
        save_checkpoint(checkpoint, {"round": 2, "w": torch.zeros(1000), "z": _Unpicklable()})
    assert load_checkpoint(checkpoint)["round"] == 1
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        ["checkpoint/state.pt", "summary.json"]


def test_pretrain_writes_under_runs_and_its_file_is_a_mentor_checkpoint(tiny_overrides, tmp_path, monkeypatch,
                                                                          capsys):
    """The documented step: `semfl pretrain` writes runs/mentors/...; psfl.mentor_checkpoint takes it."""
    import torch

    from semfl.wireless.channel import make_channel
    from semfl.models import build_model
    from semfl.models.gsc import load_mae_checkpoint

    monkeypatch.chdir(tmp_path)
    sets = sum((["--set", s] for s in tiny_overrides + ["method=psfl", "data.max_per_user=16"]), [])
    assert main(["pretrain", *sets, "--user", "1", "--arch", "gsc-m", "--epochs", "1"]) == 0
    out = Path("runs/mentors/defaults-user1-gsc-m.pth")
    printed = capsys.readouterr().out
    assert out.is_file() and f"--set psfl.mentor_checkpoint={out}" in printed
    cfg = load_config(None, tiny_overrides + ["method=psfl", f"psfl.mentor_checkpoint={out}"])
    assert cfg.table("psfl").mentor_checkpoint == str(out)
    from semfl.models.base import ImageSpec

    mentor = build_model("gsc-m", "tiny", ImageSpec(1, 28, 28, 10), make_channel(cfg.channel))
    report = load_mae_checkpoint(mentor, out, strict_shapes=False)
    saved = torch.load(out, weights_only=True)["model"]
    assert report["loaded"] and not report["mismatched"]
    assert all(torch.equal(mentor.state_dict()[k], saved[k]) for k in report["loaded"])


def test_a_damaged_side_file_or_an_empty_key_is_one_line_naming_it(finished_run, tmp_path, capsys):
    import shutil

    source = finished_run("fedavg")
    bad_config, bad_partition = tmp_path / "c", tmp_path / "p"
    shutil.copytree(source, bad_config)
    shutil.copytree(source, bad_partition)
    (bad_config / "config.toml").write_text("x = = 1\n")
    (bad_partition / "partition.json").write_text("garbage")
    for command, named in ((["compare", str(bad_config), "--out", str(tmp_path / "cmp")], f"{bad_config}/config.toml: not valid TOML"),
                           (["report", str(bad_partition)], f"{bad_partition}/partition.json: not a partition record"),
                           (["config", "show", "--set", "=5"], "--set =5: expected key=value")):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err


@pytest.mark.parametrize("command, named", [
    (["pretrain", "--epochs", "0"], "--epochs: must be at least 1"),
    (["pretrain", "--lr", "-1"], "--lr: must be a finite number > 0"),
    (["bench", "--repeats", "0"], "--repeats: must be at least 1"),
    (["bench", "--device", "tpu"], "--device: expected cpu or cuda"),
    (["deploy", "local", "configs/smoke.toml", "--users", "2", "--timeout", "-5"], "--timeout: must be a finite"),
    (["deploy", "local", "configs/smoke.toml", "--users", "2", "--resume"], "has no config.toml to resume")])
def test_bad_options_are_refused_before_anything_starts(command, named, tmp_path, capsys):
    out = tmp_path / "out"
    if command[0] == "deploy":
        out.mkdir()  # an empty folder: nothing to resume, and no Flower process may start
    assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not out.exists() or not any(out.iterdir())
