"""Robust aggregation rules (methods.aggregation): exact values on hand-made updates, and one
x1e4 user out of 9 moving the mean but not the robust rules (unit level; end to end in test_robust_runs)."""
from __future__ import annotations

import pytest
import torch

from semfl.config import ConfigError, load_config
from semfl.methods.aggregation import AggregationOptions, Aggregator


def combine(rule: str, values: list[list[float]], weights=None, reference=None, **options) -> torch.Tensor:
    agg = Aggregator(AggregationOptions(rule=rule, **options), reference)
    for i, v in enumerate(values):
        agg.add({"w": torch.tensor(v, dtype=torch.float32)}, 1.0 if weights is None else weights[i])
    return agg.result({"w": torch.zeros(len(values[0]))})["w"]


def test_rules_on_hand_computed_values():
    values = [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -1000.0]]
    assert combine("mean", values, weights=[1, 1, 1, 1]).tolist() == pytest.approx([26.5, -235.0])
    assert combine("mean", values[:2], weights=[3, 1]).tolist() == pytest.approx([1.25, 12.5])
    assert combine("median", values).tolist() == pytest.approx([2.5, 15.0])  # mean of the two middle values
    assert combine("median", values[:3]).tolist() == pytest.approx([2.0, 20.0])
    # 4 users, trim 0.1 -> ceil(0.4) = 1 cut at each end: per coordinate the middle two
    assert combine("trimmed_mean", values).tolist() == pytest.approx([2.5, 15.0])
    assert combine("trimmed_mean", values, trim_fraction=0.0).tolist() == pytest.approx([26.5, -235.0])


def test_norm_bounded_clips_to_the_median_norm_relative_to_the_reference():
    reference = {"w": torch.tensor([1.0, 1.0])}
    # updates (reply - reference): norms 3, 4, 5, 50 -> median 4.5; the last two are clipped to 4.5
    replies = [[4.0, 1.0], [1.0, 5.0], [4.0, 5.0], [31.0, 41.0]]
    got = combine("norm_bounded", replies, reference=reference)
    clipped = torch.tensor([3.0, 4.0]) * 4.5 / 5 + torch.tensor([30.0, 40.0]) * 4.5 / 50
    expected = (torch.tensor([3.0, 0.0]) + torch.tensor([0.0, 4.0]) + clipped) / 4 + 1
    assert got.tolist() == pytest.approx(expected.tolist())
    assert combine("norm_bounded", replies, reference=reference, norm_bound=100.0).tolist() == \
        pytest.approx(combine("mean", replies, weights=[1, 1, 1, 1]).tolist())


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "norm_bounded"])
def test_one_scaled_user_of_nine_moves_the_mean_not_the_robust_rules(rule):
    generator = torch.Generator().manual_seed(0)
    reference = {"w": torch.randn(1000, generator=generator)}
    updates = [0.01 * torch.randn(1000, generator=generator) + 0.02 for _ in range(9)]
    clean = torch.stack(updates).mean(0)
    replies = [reference["w"] + u for u in updates]
    replies[4] = reference["w"] + 1e4 * updates[4]

    def result(rule_):
        agg = Aggregator(AggregationOptions(rule=rule_), reference)
        for r in replies:
            agg.add({"w": r}, 1.0)
        return agg.result(reference)["w"] - reference["w"]

    assert float((result("mean") - clean).norm()) > 100 * float(clean.norm())
    assert float((result(rule) - clean).norm()) < 0.5 * float(clean.norm())


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="aggregation.rule: expected one of"):
        load_config(None, ["aggregation.rule=max"])
    with pytest.raises(ConfigError, match=r"aggregation.rule: belongs to methods fedavg, .*not to 'fedcl'"):
        load_config(None, ["aggregation.rule=median", "method=fedcl"])  # FedCL has no [aggregation]
    with pytest.raises(ConfigError, match="aggregation.trim_fraction"):
        load_config(None, ["aggregation.trim_fraction=0.5"])
    with pytest.raises(ConfigError, match="psfl.secure_aggregation shows the base station only their sum"):
        load_config(None, ["method=psfl", "psfl.secure_aggregation=true", "aggregation.rule=median"])
    assert load_config(None, ["aggregation.rule=trimmed_mean"]).table("aggregation").rule == "trimmed_mean"
