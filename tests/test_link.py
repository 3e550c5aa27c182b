"""The wireless link of PSFL eqs 12-14: rate, delay, energy, per-round SNR draws, constraints (16)-(18)."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from semfl.config import LinkConfig
from semfl.wireless.link import Link, db_to_linear, rate_bps, round_totals

LOG2_11 = math.log2(11.0)


def _fixed(snr_db: float = 10.0, **kwargs) -> LinkConfig:
    return LinkConfig(snr_process="fixed", snr_min_db=snr_db, snr_max_db=snr_db, **kwargs)


# ---------------------------------------------------------------- eqs 12-14 by hand

def test_db_to_linear():
    assert db_to_linear(0.0) == 1.0
    assert db_to_linear(10.0) == pytest.approx(10.0)
    assert db_to_linear(20.0) == pytest.approx(100.0)
    assert db_to_linear(-10.0) == pytest.approx(0.1)


def test_rate_hand_computed():
    assert rate_bps(1e6, 10.0) == pytest.approx(1e6 * LOG2_11, rel=1e-12)
    assert rate_bps(1e6, 0.0) == pytest.approx(1e6)  # log2(1 + 1) = 1
    assert rate_bps(2e6, 10.0) == pytest.approx(2 * rate_bps(1e6, 10.0))


def test_uplink_delay_and_energy_hand_computed():
    link = Link(_fixed(10.0, uplink_bandwidth_hz=1e6, uplink_power_w=0.1), users=2, seed=0)
    delay, energy = link.cost("uplink", 1_000_000, 10.0)
    assert delay == pytest.approx(1.0 / LOG2_11, rel=1e-12)
    assert energy == pytest.approx(0.1 / LOG2_11, rel=1e-12)
    assert energy == pytest.approx(0.1 * delay, rel=1e-12)
    assert link.cost("uplink", 0, 10.0) == (0.0, 0.0)

    tr = link.send(3, 1, "uplink", 1_000_000)
    assert (tr.round, tr.user, tr.direction, tr.bits) == (3, 1, "uplink", 1_000_000)
    assert tr.snr_db == 10.0
    assert tr.delay_s == pytest.approx(1.0 / LOG2_11) and tr.energy_j == pytest.approx(0.1 / LOG2_11)


def test_downlink_uses_downlink_bandwidth_and_power():
    cfg = _fixed(10.0, uplink_bandwidth_hz=1e6, uplink_power_w=0.1, downlink_bandwidth_hz=4e6, downlink_power_w=2.0)
    link = Link(cfg, users=1, seed=0)
    delay, energy = link.cost("downlink", 1_000_000, 10.0)
    assert delay == pytest.approx(1.0 / (4 * LOG2_11), rel=1e-12)
    assert energy == pytest.approx(2.0 * delay, rel=1e-12)
    up_delay, up_energy = link.cost("uplink", 1_000_000, 10.0)
    assert up_delay == pytest.approx(4 * delay) and up_energy == pytest.approx(0.1 * up_delay)


def test_unknown_direction():
    link = Link(LinkConfig(), users=1, seed=0)
    with pytest.raises(ValueError, match="direction"):
        link.cost("sideways", 10, 10.0)


# ---------------------------------------------------------------- SNR draws

def test_uniform_snr_draws_within_range_and_deterministic():
    cfg = LinkConfig(snr_process="uniform", snr_min_db=3.0, snr_max_db=17.0)
    link = Link(cfg, users=50, seed=7)
    draws = np.stack([link.snrs_db(r) for r in range(20)])
    assert draws.shape == (20, 50)
    assert draws.min() >= 3.0 and draws.max() <= 17.0
    assert draws.std() > 2.0  # actually spread over the range, not a constant
    # each user its own SNR within a round (uniform on 14 dB: sd 4.0; over 50 users, 3 is 4 sigma below)
    assert all(draws[r].std() > 3.0 and len(np.unique(draws[r])) == 50 for r in range(20))
    # different rounds, different draws
    assert not np.allclose(draws[0], draws[1])
    # a fresh link with the same seed (a resumed run) sees the same SNRs, in any query order
    again = Link(cfg, users=50, seed=7)
    for r in reversed(range(20)):
        np.testing.assert_array_equal(again.snrs_db(r), draws[r])
    # repeated queries are stable
    np.testing.assert_array_equal(link.snrs_db(4), draws[4])
    assert link.snr_db(4, 9) == float(draws[4, 9])
    # another seed, other draws
    assert not np.allclose(Link(cfg, users=50, seed=8).snrs_db(0), draws[0])


def test_uniform_draws_mean_near_midpoint():
    link = Link(LinkConfig(snr_min_db=0.0, snr_max_db=25.0), users=1000, seed=0)
    values = np.concatenate([link.snrs_db(r) for r in range(5)])
    assert abs(values.mean() - 12.5) < 0.5


def test_fixed_process_is_midpoint():
    link = Link(LinkConfig(snr_process="fixed", snr_min_db=4.0, snr_max_db=16.0), users=3, seed=1)
    for r in (0, 1, 9):
        np.testing.assert_array_equal(link.snrs_db(r), np.full(3, 10.0))


# ---------------------------------------------------------------- drain and totals

def test_drain_aggregates_per_user_and_direction_and_clears_the_round():
    link = Link(_fixed(10.0), users=3, seed=0)
    link.send(1, 0, "uplink", 1000)
    link.send(1, 0, "uplink", 500)
    link.send(1, 0, "downlink", 2000)
    link.send(1, 2, "uplink", 700)
    link.send(2, 1, "uplink", 999)  # another round: kept
    rows = link.drain(1)
    assert [r["user"] for r in rows] == [0, 2]
    r0, r2 = rows
    rate = 1e6 * LOG2_11
    assert r0["round"] == 1 and r0["scope"] == "link" and r0["snr_db"] == 10.0
    assert r0["uplink_bits"] == 1500 and isinstance(r0["uplink_bits"], int)
    assert r0["downlink_bits"] == 2000
    assert r0["uplink_delay_s"] == pytest.approx(1500 / rate)
    assert r0["uplink_energy_j"] == pytest.approx(0.1 * 1500 / rate)
    assert r0["downlink_delay_s"] == pytest.approx(2000 / rate)
    assert r0["downlink_energy_j"] == pytest.approx(1.0 * 2000 / rate)
    assert r2["uplink_bits"] == 700 and r2["downlink_bits"] == 0
    assert r2["downlink_delay_s"] == 0.0 and r2["downlink_energy_j"] == 0.0
    assert r0["violations"] == [] and r2["violations"] == []
    # the round is cleared, other rounds are kept
    assert link.drain(1) == []
    assert [(t.round, t.user, t.bits) for t in link.transfers] == [(2, 1, 999)]
    (row,) = link.drain(2)
    assert row["user"] == 1 and row["uplink_bits"] == 999
    assert link.transfers == []


def test_drain_uses_each_users_snr_of_the_round():
    link = Link(LinkConfig(snr_min_db=0.0, snr_max_db=25.0), users=2, seed=3)
    link.send(5, 0, "uplink", 10_000)
    link.send(5, 1, "uplink", 10_000)
    rows = link.drain(5)
    for row in rows:
        snr = link.snr_db(5, row["user"])
        assert row["snr_db"] == snr
        assert row["uplink_delay_s"] == pytest.approx(10_000 / (1e6 * math.log2(1 + 10 ** (snr / 10))))


def test_violations():
    rate = 1e6 * LOG2_11
    cfg = _fixed(10.0, tau_req_s=0.5 / LOG2_11, energy_budget_j=0.1 * 0.5 / LOG2_11)
    link = Link(cfg, users=2, seed=0)
    link.send(0, 0, "uplink", 1_000_000)  # tau = 1/log2(11) > tau_req; E = 0.1 tau > budget
    link.send(0, 1, "uplink", 100_000)  # well within both
    link.send(0, 1, "downlink", 10_000_000)  # downlink does not count against the uplink constraints
    rows = {r["user"]: r for r in link.drain(0)}
    assert rows[0]["uplink_delay_s"] == pytest.approx(1e6 / rate)
    assert sorted(rows[0]["violations"]) == ["delay", "energy"]
    assert rows[1]["violations"] == []

    # only the delay constraint
    link = Link(_fixed(10.0, tau_req_s=0.5 / LOG2_11), users=1, seed=0)
    link.send(0, 0, "uplink", 1_000_000)
    assert link.drain(0)[0]["violations"] == ["delay"]
    # only the energy constraint
    link = Link(_fixed(10.0, energy_budget_j=0.01), users=1, seed=0)
    link.send(0, 0, "uplink", 1_000_000)
    assert link.drain(0)[0]["violations"] == ["energy"]
    # 0 = unconstrained
    link = Link(_fixed(10.0), users=1, seed=0)
    link.send(0, 0, "uplink", 10**9)
    assert link.drain(0)[0]["violations"] == []


def test_power_violation():
    link = Link(_fixed(10.0, uplink_power_w=0.2, p_max_w=0.1), users=1, seed=0)
    link.send(0, 0, "uplink", 10)
    assert link.drain(0)[0]["violations"] == ["power"]
    ok = Link(_fixed(10.0, uplink_power_w=0.1, p_max_w=0.1), users=1, seed=0)
    ok.send(0, 0, "uplink", 10)
    assert ok.drain(0)[0]["violations"] == []


def test_round_totals_and_energy_term():
    cfg = _fixed(10.0, tau_req_s=1.5 / (1e6 * LOG2_11))
    link = Link(cfg, users=3, seed=0)
    link.send(0, 0, "uplink", 1)
    link.send(0, 1, "uplink", 2)
    link.send(0, 1, "downlink", 10)
    link.send(0, 2, "uplink", 4)  # delay 4/rate > tau_req: one violation (and 2/rate as well)
    rows = link.drain(0)
    totals = round_totals(rows, eta=0.5)
    rate = 1e6 * LOG2_11
    assert totals["uplink_bits"] == 7 and totals["downlink_bits"] == 10
    assert totals["uplink_energy_j"] == pytest.approx(0.1 * 7 / rate)
    assert totals["downlink_energy_j"] == pytest.approx(1.0 * 10 / rate)
    # users transmit in parallel: the round's delay is the slowest user's
    assert totals["uplink_delay_s"] == pytest.approx(4 / rate)
    assert totals["downlink_delay_s"] == pytest.approx(10 / rate)
    assert totals["violations"] == 2
    assert totals["energy_term"] == pytest.approx(0.5 * totals["uplink_energy_j"])
    assert totals["energy_term"] == pytest.approx(0.5 * sum(r["uplink_energy_j"] for r in rows))


def test_round_totals_empty():
    totals = round_totals([], eta=1.0)
    assert totals["uplink_bits"] == 0 and totals["uplink_delay_s"] == 0.0
    assert totals["violations"] == 0 and totals["energy_term"] == 0


def test_config_snr_fields_used():
    cfg = replace(LinkConfig(), snr_min_db=20.0, snr_max_db=20.0)
    link = Link(cfg, users=4, seed=11)
    np.testing.assert_allclose(link.snrs_db(0), 20.0)
