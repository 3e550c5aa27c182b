"""End to end from scratch: 9 IID FedAvg users learn the semantic model while one of them (user 4)
sends its update x1e4 every round. Every rule's clean run and attacked run are compared: each robust
rule under attack ends within 2 points of the clean mean run and of its own clean run; the attacked
mean falls to chance (or overflows and the run stops). The fast version, from a pretrained start, is
test_aggregation's end-to-end test; the unit-level check is there too."""
from __future__ import annotations

import pytest

from test_aggregation import ROBUST, robust_run

pytestmark = pytest.mark.slow


def test_robust_rules_learn_from_scratch_under_one_scaled_user_of_nine(fmnist_root, tmp_path, monkeypatch):
    """Why this set-up. Robust statistics assume the honest users' updates are alike, hence IID users.
    The accuracy is the frozen classifier's on the reconstructions, so the classifier must get clean
    images right (1.0 here; the earlier 5 epochs at lr 1e-3 got 0.47, and the rules' final accuracies
    at 6 rounds, clean mean 0.595, median 0.47, trimmed_mean 0.70, norm_bounded 0.58, measured that
    classifier's instability, not the rules). With it, every clean run has flattened at 1.0 by round 7.
    Measured (rounds 0-10; deterministic; 272 s on 2 busy cores): clean mean 0.11, 0.125, 0.365, 0.565,
    0.73, 0.925, then 1.0 from round 6; clean and attacked median, trimmed_mean and norm_bounded all
    1.0 from round 7 on (the clean trimmed mean and norm bound dip to 0.745 / 0.725 in round 6 or 5:
    single rounds on the way up are noisy, final ones are not); the attacked mean 0.125 from round 1."""
    import semfl.report

    monkeypatch.setattr(semfl.report, "write_run_report", lambda *a, **k: None)
    overrides = ["data.max_per_user=60", "train.optimizer=adam", "train.lr=0.01", "train.local_epochs=3",
                 "rounds=10", "eval.every=1"]
    cache = tmp_path / "cache"
    clean = {rule: robust_run(fmnist_root, cache, tmp_path / f"{rule}-clean", rule, False, overrides)
             for rule in ("mean", *ROBUST)}
    attacked = {rule: robust_run(fmnist_root, cache, tmp_path / f"{rule}-attacked", rule, True, overrides)
                for rule in ("mean", *ROBUST)}
    curve = lambda rows: rows and [round(r["accuracy"], 3) for r in rows]  # noqa: E731
    print({"clean": {k: curve(v) for k, v in clean.items()}, "attacked": {k: curve(v) for k, v in attacked.items()}})
    final = lambda rows: rows and rows[-1]["accuracy"]  # noqa: E731
    reference = final(clean["mean"])
    for rule, rows in clean.items():  # every clean run has learnt and flattened: the last 3 rounds agree
        last = [r["accuracy"] for r in rows[-3:]]
        assert min(last) > 0.9 and max(last) - min(last) <= 0.02, (rule, curve(rows))
    assert final(attacked["mean"]) is None or final(attacked["mean"]) < reference - 0.3, curve(attacked["mean"])
    for rule in ROBUST:
        assert attacked[rule] is not None, rule
        assert abs(final(attacked[rule]) - reference) <= 0.02, (rule, curve(attacked[rule]), reference)
        assert abs(final(attacked[rule]) - final(clean[rule])) <= 0.02, (rule, curve(attacked[rule]), curve(clean[rule]))
