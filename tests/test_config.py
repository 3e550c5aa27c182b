"""Typed config: defaults, TOML loading, --set overrides, validation errors that name the field, the CLI's error path."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from semfl import cli
from semfl.config import (Config, ConfigError, DataConfig, LinkConfig, TrainConfig, apply_overrides, dump_config,
                          from_dict, load_config)


def _write(tmp_path, text: str, name: str = "cfg.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults and loading

def test_empty_file_gives_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, ""))
    ref = Config()
    assert cfg.method == ref.method == "fedavg"
    assert cfg.dataset == "fashion-mnist"
    assert cfg.users == ref.users and cfg.rounds == ref.rounds and cfg.seed == ref.seed
    assert cfg.data == DataConfig()
    assert cfg.link == LinkConfig()
    assert cfg.train == TrainConfig()
    assert cfg.to_dict() == load_config(None).to_dict()
    assert set(cfg.methods) == {"foundation", "aggregation"}  # the tables FedAvg reads, with their defaults; no [psfl]


def test_toml_file_loads_typed_fields(tmp_path):
    path = _write(tmp_path, """
method = "fedavg"
dataset = "cifar10"
users = 4
rounds = 7
seed = 3
scale = "tiny"

[train]
lr = 1          # an integer is accepted for a float field and converted
batch_size = 16
optimizer = "adam"

[link]
snr_min_db = 5
snr_max_db = 20.5
tau_req_s = 0.25

[data]
sizes = [10, 20, 30, 40]
download = false
root = "/tmp/somewhere"

[eval]
snr_sweep = [0, 10]
""")
    cfg = load_config(path)
    assert (cfg.dataset, cfg.users, cfg.rounds, cfg.seed, cfg.scale) == ("cifar10", 4, 7, 3, "tiny")
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 16 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.optimizer == "adam"
    assert cfg.link.snr_min_db == 5.0 and isinstance(cfg.link.snr_min_db, float)
    assert cfg.link.snr_max_db == 20.5 and cfg.link.tau_req_s == 0.25
    assert cfg.data.sizes == [10, 20, 30, 40] and cfg.data.download is False and cfg.data.root == "/tmp/somewhere"
    assert cfg.eval.snr_sweep == [0.0, 10.0] and all(isinstance(v, float) for v in cfg.eval.snr_sweep)
    # untouched fields keep their defaults
    assert cfg.train.momentum == TrainConfig().momentum
    assert cfg.link.uplink_bandwidth_hz == 1e6


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"^config: "):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"^config: "):
        load_config(_write(tmp_path, "users = = 3"))


# ---------------------------------------------------------------- overrides

def test_overrides_top_level_and_dotted(tmp_path):
    path = _write(tmp_path, "users = 3\n[train]\nlr = 0.01\n")
    cfg = load_config(path, ["rounds=3", "train.lr=0.05", "data.sizes=[1,2,3]", "method=fedavg",
                             "link.snr_max_db = 12", "data.download=false"])
    assert cfg.rounds == 3
    assert cfg.train.lr == 0.05
    assert cfg.data.sizes == [1, 2, 3]
    assert cfg.method == "fedavg"  # a bare word is a string
    assert cfg.link.snr_max_db == 12.0
    assert cfg.data.download is False


def test_apply_overrides_on_dict():
    raw = {"train": {"lr": 0.1, "batch_size": 8}}
    out = apply_overrides(raw, ["train.lr=0.05", "rounds=3", "data.sizes=[1,2,3]", "method=fedavg", "data.root=/x/y"])
    assert out == {"train": {"lr": 0.05, "batch_size": 8}, "rounds": 3, "data": {"sizes": [1, 2, 3], "root": "/x/y"},
                   "method": "fedavg"}
    # later overrides win
    assert apply_overrides({}, ["rounds=2", "rounds=5"]) == {"rounds": 5}
    # a string value with '=' in it keeps everything after the first '='
    assert apply_overrides({}, ['data.root="a=b"']) == {"data": {"root": "a=b"}}


def test_override_errors():
    with pytest.raises(ConfigError, match=r"^--set rounds"):
        apply_overrides({}, ["rounds"])
    with pytest.raises(ConfigError, match=r"^users\.x: users is not a table"):
        apply_overrides({"users": 3}, ["users.x=1"])


# ---------------------------------------------------------------- validation errors

@pytest.mark.parametrize("overrides, field", [
    (["bogus=1"], "bogus"),
    (["train.lrr=0.1"], "train.lrr"),
    (['train.lr="abc"'], "train.lr"),
    (["train.lr=abc"], "train.lr"),  # a bare word is a string: still the wrong type
    (["users=2.5"], "users"),
    (["users=true"], "users"),  # bool is not an int
    (["users=0"], "users"),
    (["rounds=0"], "rounds"),
    (["link.snr_min_db=30"], "link.snr_min_db"),  # default max is 25
    (["dataset=imagenet"], "dataset"),
    (["method=nomethod"], "method"),
    (["model.arch=vgg"], "model.arch"),
    (["users=3", "data.sizes=[1,2]"], "data.sizes"),
    (["data.sizes=[1,2.5,3,4,5]"], "data.sizes[1]"),
    (["train.optimizer=rmsprop"], "train.optimizer"),
    (["train=3"], "train"),
    (["link.uplink_power_w=0"], "link.uplink_power_w"),
    (["classifier.depth=19"], "classifier.depth"),
    (["device=tpu"], "device"),
    (["train.weight_decay=-1.0"], "train.weight_decay"),
    (["classifier.batch_size=0"], "classifier.batch_size"),
    (["classifier.lr=0.0"], "classifier.lr"),
    (["train.lr=inf"], "train.lr"),  # passes "> 0", then trains to NaN
    (["eval.snr_db=nan"], "eval.snr_db"),  # passes every comparison
    (["eval.snr_sweep=[10.0, nan]"], "eval.snr_sweep"),
    (["link.snr_max_db=inf"], "link.snr_max_db"),
])
def test_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert message.startswith(field + ":"), message
    assert "\n" not in message


def test_infinity_is_accepted_only_where_it_means_something():
    cfg = load_config(None, ["method=fedcl", "fedcl.downlink_snr_db=inf"])  # inf = a noiseless downlink
    assert math.isinf(cfg.table("fedcl").downlink_snr_db)
    with pytest.raises(ConfigError, match=r"^fedcl.downlink_snr_db: must be a number, got nan"):
        load_config(None, ["method=fedcl", "fedcl.downlink_snr_db=nan"])


def test_unknown_key_lists_allowed():
    with pytest.raises(ConfigError, match=r"^train\.lrr: unknown key \(allowed: .*\blr\b"):
        from_dict({"train": {"lrr": 0.1}})


def test_file_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^link\.snr_min_db:"):
        load_config(_write(tmp_path, "[link]\nsnr_min_db = 30\nsnr_max_db = 20\n"))
    with pytest.raises(ConfigError, match=r"^users:"):
        load_config(_write(tmp_path, "users = 0\n", "b.toml"))


def test_snr_range_equal_is_valid():
    cfg = load_config(None, ["link.snr_min_db=10", "link.snr_max_db=10"])
    assert cfg.link.snr_min_db == cfg.link.snr_max_db == 10.0


def test_fresh_process_knows_method_tables_on_first_load_and_runs_without_optional_packages(tiny_overrides, tmp_path):
    # Method modules register their [tables] on import; the very first load_config of a process
    # (before anything imported semfl.methods) must already know them. `make run` installs semfl
    # without its extras: with flwr unimportable a config loads without Sionna, torchmetrics or
    # flwr (they take seconds), and a PSFL run goes through. The same fresh process checks that Sionna
    # is imported at first use (not with semfl.wireless.channel) and leaves torch's random state alone
    # (tests/test_channel.py's check, here to save a process start).
    script = (
        "import sys\n"
        "class NoFlower:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'flwr': raise ImportError('flwr is not installed here')\n"
        "sys.meta_path.insert(0, NoFlower())\n"
        "from semfl.config import load_config, _METHOD_TABLES\n"
        "cfg = load_config(None, ['method=psfl'])\n"
        "assert set(cfg.methods) == {'psfl', 'foundation', 'aggregation'} < set(_METHOD_TABLES), (sorted(cfg.methods), sorted(_METHOD_TABLES))\n"
        "assert not {'sionna', 'torchmetrics', 'flwr'} & set(sys.modules), sorted({'sionna', 'torchmetrics', 'flwr'} & set(sys.modules))\n"
        "import dataclasses\n"
        "field = dataclasses.fields(_METHOD_TABLES['psfl'])[0].name\n"
        "value = getattr(cfg.methods['psfl'], field)\n"
        "import tomli_w\n"
        "text = tomli_w.dumps({'v': value})[4:].strip()\n"
        "assert getattr(load_config(None, ['method=psfl', f'psfl.{field}={text}']).table('psfl'), field) == value\n"
        "import torch; torch.manual_seed(0); a = torch.rand(3); torch.manual_seed(0)\n"
        "import semfl.wireless.channel as c; assert 'sionna' not in sys.modules\n"  # imported at first use
        "c.sionna_phy(); assert 'sionna.phy' in sys.modules; b = torch.rand(3); assert torch.equal(a, b), (a, b)\n"
        "from semfl.cli import main\n"
        "sys.exit(main(['run', '--out', sys.argv[1]] + [a for o in sys.argv[2:] for a in ('--set', o)]))\n"
    )
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", script, str(out), *tiny_overrides, "method=psfl", "rounds=1",
                             "users=2", "eval.snr_sweep=[]", "data.max_per_user=32", "data.test_samples=20",
                             "eval.grid_images=2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "summary.json").is_file()


# ---------------------------------------------------------------- round trip

def test_dump_load_round_trip(tmp_path):
    cfg = load_config(None, ["rounds=4", "users=3", "train.lr=0.05", "data.sizes=[5,6,7]", "data.root=/data",
                             "link.tau_req_s=0.5", "eval.snr_sweep=[1.5, 2.5]", "scale=tiny"])
    text = dump_config(cfg)
    path = _write(tmp_path, text, "resolved.toml")
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()
    for f in dataclasses.fields(Config):
        if f.name != "methods":
            assert getattr(again, f.name) == getattr(cfg, f.name), f.name
    assert set(again.methods) == set(cfg.methods)
    for name in cfg.methods:
        assert again.methods[name] == cfg.methods[name]
    # dumping the reloaded config gives the same text
    assert dump_config(again) == text


def test_round_trip_of_defaults_with_none(tmp_path):
    cfg = Config()
    assert cfg.data.root is None  # TOML has no null: left out, comes back as the default
    again = load_config(_write(tmp_path, dump_config(load_config(None))))
    assert again.data.root is None and again.classifier.cache_dir is None


# ---------------------------------------------------------------- CLI

def test_cli_reports_config_error_without_training(tmp_path, capsys, monkeypatch):
    import semfl.runtimes.run as run_module

    class NoRunner:
        def __init__(self, *args, **kwargs):
            raise AssertionError("training must not start on a config error")

    monkeypatch.setattr(run_module, "Runner", NoRunner)
    path = _write(tmp_path, "")
    assert cli.main(["run", str(path), "--set", "users=0"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("semfl: error: users: ")
    assert captured.out == ""


def test_cli_unknown_key(tmp_path, capsys):
    path = _write(tmp_path, "[train]\nlrr = 0.1\n")
    assert cli.main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("semfl: error: train.lrr: ")
    assert not (tmp_path / "run").exists()
