"""End to end: 1 of 9 FedAvg users sends its update x1e4. Under the mean the model falls to chance
(or overflows and the run stops); under each robust rule it keeps learning, and norm_bounded stays
within 2 points of the clean run. The unit-level check is test_aggregation (fast)."""
from __future__ import annotations

import pytest

from poisoning import poisoned, scaled_update
from semfl.config import load_config
from semfl.files import read_jsonl
from semfl.runtimes.run import Runner, RunError

pytestmark = pytest.mark.slow


def final_accuracy(fmnist_root, tmp_path, name: str, rule: str, attack: bool) -> float | None:
    cfg = load_config(None, [
        f"data.root={fmnist_root}", f"classifier.cache_dir={tmp_path / 'cache'}", "scale=tiny", "users=9", "rounds=6",
        "data.download=false", "data.test_samples=200", "data.max_per_user=60", "data.partition=iid", "eval.grid_images=0",
        "eval.snr_sweep=[]", "eval.every=100", "classifier.epochs=5", "train.optimizer=adam", "train.lr=0.01",
        "train.local_epochs=3", "channel.train_snr=fixed", "channel.snr_db=20", "eval.snr_db=20",
        f"aggregation.rule={rule}"])
    transport = poisoned(4, scaled_update(1e4)) if attack else None
    try:
        Runner(cfg, tmp_path / name, show_progress=False, log=lambda m: None, transport=transport).execute()
    except RunError as error:
        assert "non-finite" in str(error)
        return None
    rows = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if r["scope"] == "global"]
    assert rows[-1]["round"] == cfg.rounds
    return rows[-1]["accuracy"]


def test_robust_rules_withstand_one_scaled_user_of_nine_and_the_mean_does_not(fmnist_root, tmp_path):
    clean = final_accuracy(fmnist_root, tmp_path, "clean", "mean", attack=False)
    mean = final_accuracy(fmnist_root, tmp_path, "mean", "mean", attack=True)
    rules = ("median", "trimmed_mean", "norm_bounded")
    attacked = {rule: final_accuracy(fmnist_root, tmp_path, rule, rule, attack=True) for rule in rules}
    print({"clean mean": clean, "attacked mean": mean, "attacked": attacked})  # shown with -s
    # measured (deterministic for this config and seed): clean 0.595, attacked mean 0.10, attacked
    # median 0.47, trimmed_mean 0.70, norm_bounded 0.58. At 6 tiny rounds the rules' own differences
    # exceed 2 points, so only norm_bounded meets the "within 2 points of the clean run";
    # every robust rule keeps the model learning where the mean collapses to chance.
    assert clean > 0.3  # the clean run learns (chance is 0.1), so the comparison means something
    assert mean is None or mean < clean - 0.3, mean
    for rule in rules:
        assert attacked[rule] is not None and attacked[rule] > 0.4, (rule, attacked, clean)
        assert mean is None or attacked[rule] > mean + 0.3, (rule, attacked, mean)
    assert abs(attacked["norm_bounded"] - clean) <= 0.02, (attacked, clean)
