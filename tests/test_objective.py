"""One objective per comparison: every shipped sweep compares methods trained on the same task loss."""
from __future__ import annotations

from pathlib import Path

import pytest

from semfl.config import load_config
from semfl.experiments.objectives import objective_conflicts, point_objective
from semfl.methods import get_method
from semfl.objective import Objective, declares
from semfl.experiments.sweep import load_sweep

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SWEEPS = sorted(CONFIGS.rglob("sweep-*.toml"))


def test_objectives_state_each_methods_loss():
    psfl = load_config(CONFIGS / "psfl" / "fashion-mnist.toml")
    assert get_method("psfl").objective(psfl).describe() == (
        "mse + 0.01*CE(classifier) + 0.001*KL(mentor||student)/task' + 0.01*sem(mentor,student)/(task+task') "
        "| adam lr=0.002")
    fedavg = load_config(None, ["train.task_weight=0", "train.lr=0.05"])
    assert get_method("fedavg").objective(fedavg).fields() == {
        "train_objective": "mse | sgd lr=0.05", "task_objective": "mse", "optimiser": "sgd lr=0.05"}
    # the paper's unit weights: the distillation and semantic terms are still there, at weight 1
    paper = load_config(None, ["method=psfl", "psfl.dis_weight=0"])
    assert get_method("psfl").objective(paper).task == "mse + 1*CE(classifier)"
    assert "KL" not in get_method("psfl").objective(paper).describe()


def test_every_method_states_its_objective_with_its_own_terms():
    """Every registered method states what it trains on (metrics row 0, summary.json, verify's groups
    table); the methods with terms of their own name them."""
    from semfl.methods import available_methods

    stated = {}
    for name in available_methods():
        arch = ["model.arch=vq-jscc"] if name in ("fedsfr", "fedsfd", "skbs") else []
        objective = get_method(name).objective(load_config(None, [f"method={name}", *arch]))
        assert objective is not None, f"{name} states no objective"
        stated[name] = objective
    for name in ("fedavg-split", "fedproto", "fedcl"):  # the split family classifies through its own head
        assert stated[name].task == "CE(head(channel(encoder(x))), y)", name
    assert "prototype" in stated["fedproto"].describe() and "SCG" in stated["fedcl"].describe()
    assert stated["fedavg-split"].describe() == "CE(head(channel(encoder(x))), y) | sgd lr=0.01"
    assert "other model's x_hat" in stated["skbs"].describe()
    assert "middle" in stated["fedsfd"].describe() and stated["fedsfd"].comparable(stated["fedsfr"])
    assert not stated["fedavg-split"].comparable(stated["fedavg"])  # CE of a head is not eq 20's task loss


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_sweep_compares_methods_on_one_objective(path):
    sweep = load_sweep(path)
    assert objective_conflicts(sweep) == []
    if path.parent.name == "psfl":  # the PSFL studies compare on accuracy: every method states its loss
        objectives = {p.variant: point_objective(p) for p in sweep.points}
        assert None not in objectives.values()
        tasks = {o.task for o in objectives.values()}
        # the tuned objective, or the paper's unit weights in the sweep run as the paper has it
        assert tasks == {"mse + 1*CE(classifier)" if path.stem == "sweep-paper-objective" else "mse + 0.01*CE(classifier)"}


def test_psfl_contender_configs_train_psfl_students_objective():
    psfl = load_config(CONFIGS / "psfl" / "fashion-mnist.toml")
    student = get_method("psfl").objective(psfl)
    for path in sorted((CONFIGS / "psfl" / "contenders").glob("*.toml")):
        cfg = load_config(path)
        assert get_method(cfg.method).objective(cfg).comparable(student), path.name


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_sweep_that_mixes_objectives_is_caught_unless_the_variant_names_it(tmp_path):
    head = 'method = "psfl"\nrounds = 2\npsfl.ce_weight = 0.01\ntrain.task_weight = 0.0\n[sweep]\nseed = [0, 1]\n'
    mixed = load_sweep(write(tmp_path / "mixed.toml", head + 'method = ["psfl", "fedavg"]\n'))
    problems = objective_conflicts(mixed)
    assert [p.split(":")[0] for p in problems] == ["fedavg__s0", "fedavg__s1"]
    assert "trains on mse | sgd lr=0.01, but psfl on mse + 0.01*CE(classifier) | sgd lr=0.01" in problems[0]
    named = load_sweep(write(tmp_path / "named.toml", head + 'method = ["psfl"]\n[sweep.variants]\n'
                                                      '"fedavg-ce0" = ["method=fedavg"]\n'
                                                      '"fedavg-ce0-adam" = ["method=fedavg", "train.optimizer=adam"]\n'
                                                      '"fedavg-ce0-adam0.01" = ["method=fedavg", "train.optimizer=adam"]\n'))
    # naming the CE weight is not enough when the optimiser differs too
    assert [p.split(":")[0] for p in objective_conflicts(named)] == ["fedavg-ce0-adam__s0", "fedavg-ce0-adam__s1"]


def test_declares_reads_whole_words():
    ref = Objective(0.01, "adam", 0.002)
    assert declares("fedavg-ce0", Objective(0.0, "adam", 0.002), ref)
    assert not declares("fedavg-ce0.5", Objective(0.0, "adam", 0.002), ref)  # "ce0" is not a word of it
    assert declares("fedavg-ce1-sgd0.05", Objective(1.0, "sgd", 0.05), ref)
    assert not declares("fedavg-ce1", Objective(1.0, "sgd", 0.05), ref)


def test_paper_objective_preset_states_unit_weights_and_sgd():
    cfg = load_config(CONFIGS / "psfl" / "paper-objective.toml")
    psfl = get_method("psfl").objective(cfg)
    assert psfl.describe() == ("mse + 1*CE(classifier) + 1*KL(mentor||student)/task' + "
                               "1*sem(mentor,student)/(task+task') | sgd lr=0.01")
    assert cfg.table("foundation").ce_weight == 1.0 and cfg.table("psfl").mentor_lr == 0.0
    contender = load_config(CONFIGS / "psfl" / "paper-objective.toml", ["method=fedavg", "model.arch=gsc-m"],
                            foreign="drop")  # as a sweep's contender point: PSFL's tables are not FedAvg's
    assert get_method("fedavg").objective(contender).comparable(psfl)


def test_paper_objective_preset_runs_on_a_dataset_smaller_than_table_i(fmnist_root, tmp_path, shared_cache):
    """The preset as shipped (9 users, Table I volumes summing to 50,000) on the 800-image fixture:
    the sizes are scaled to fit, and one tiny round of PSFL with unit weights and SGD runs."""
    from semfl.files import read_jsonl
    from semfl.runtimes.run import Runner

    cfg = load_config(CONFIGS / "psfl" / "paper-objective.toml", [
        f"data.root={fmnist_root}", "data.download=false", f"classifier.cache_dir={shared_cache}",
        "classifier.epochs=1", "scale=tiny", "rounds=1", "data.test_samples=50", "psfl.user_eval_samples=20",
        "foundation.samples=100", "foundation.epochs=1", "eval.snr_sweep=[]", "eval.grid_images=0"])
    logs = []
    out = Runner(cfg, tmp_path / "run", show_progress=False, log=logs.append).execute()
    assert any(line.startswith("data.sizes sum to 50000 but fashion-mnist has 800 training images") for line in logs), logs
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[0]["train_objective"].startswith("mse + 1*CE(classifier) + 1*KL")
    final = [r for r in rows if r["scope"] == "global"][-1]
    assert final["round"] == 1 and final["loss"] == final["loss"]  # a number, not NaN
