"""The wireless link that carries FL payloads (PSFL eqs 12-14) and the constraints (16)-(18).

rate v = B log2(1 + psi_lin), delay tau = Z / v, energy E = P tau, with psi in dB in the
config and converted to linear here. Each user has one SNR per round, shared by its uplink
and downlink (the paper's psi_{k,t}); the draws are a pure function of (seed, round), so a
resumed run sees the same SNRs.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from semfl.config import LinkConfig

DIRECTIONS = ("uplink", "downlink")


def db_to_linear(snr_db: float) -> float:
    return 10.0 ** (snr_db / 10.0)


def rate_bps(bandwidth_hz: float, snr_db: float) -> float:
    """Shannon rate of eq. 12 with the SNR given in dB."""
    return bandwidth_hz * math.log2(1.0 + db_to_linear(snr_db))


@dataclass
class Transfer:
    round: int
    user: int
    direction: str
    bits: int
    snr_db: float
    delay_s: float
    energy_j: float


class Link:
    def __init__(self, cfg: LinkConfig, users: int, seed: int):
        self.cfg = cfg
        self.users = users
        self.seed = seed
        self._snr_cache: dict[int, np.ndarray] = {}
        self.transfers: list[Transfer] = []

    def snrs_db(self, round_: int) -> np.ndarray:
        """psi_{k,t} for every user in dB: uniform in [min, max] by default, or fixed at the midpoint."""
        if round_ not in self._snr_cache:
            if self.cfg.snr_process == "fixed":
                value = 0.5 * (self.cfg.snr_min_db + self.cfg.snr_max_db)
                self._snr_cache[round_] = np.full(self.users, value)
            else:
                rng = np.random.default_rng([self.seed, 0x11E4, round_])
                self._snr_cache[round_] = rng.uniform(self.cfg.snr_min_db, self.cfg.snr_max_db, self.users)
        return self._snr_cache[round_]

    def snr_db(self, round_: int, user: int) -> float:
        return float(self.snrs_db(round_)[user])

    def _side(self, direction: str) -> tuple[float, float]:
        if direction == "uplink":
            return self.cfg.uplink_bandwidth_hz, self.cfg.uplink_power_w
        if direction == "downlink":
            return self.cfg.downlink_bandwidth_hz, self.cfg.downlink_power_w
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")

    def cost(self, direction: str, bits: int, snr_db: float) -> tuple[float, float]:
        """(delay_s, energy_j) of sending `bits` at `snr_db` (eqs 12-14)."""
        bandwidth, power = self._side(direction)
        delay = bits / rate_bps(bandwidth, snr_db)
        return delay, power * delay

    def send(self, round_: int, user: int, direction: str, bits: int) -> Transfer:
        snr = self.snr_db(round_, user)
        delay, energy = self.cost(direction, bits, snr)
        transfer = Transfer(round_, user, direction, int(bits), snr, delay, energy)
        self.transfers.append(transfer)
        return transfer

    def drain(self, round_: int) -> list[dict]:
        """Per-user link rows of a round (metrics.jsonl scope "link"); clears that round's records."""
        per_user: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        kept = []
        for tr in self.transfers:
            if tr.round != round_:
                kept.append(tr)
                continue
            row = per_user[tr.user]
            row[f"{tr.direction}_bits"] += tr.bits
            row[f"{tr.direction}_delay_s"] += tr.delay_s
            row[f"{tr.direction}_energy_j"] += tr.energy_j
            row[f"{tr.direction}_messages"] += 1
        self.transfers = kept
        rows = []
        for user in sorted(per_user):
            row = {"round": round_, "scope": "link", "user": user, "snr_db": self.snr_db(round_, user)}
            for direction in DIRECTIONS:
                for key in ("bits", "delay_s", "energy_j"):
                    value = per_user[user].get(f"{direction}_{key}", 0.0)
                    row[f"{direction}_{key}"] = int(value) if key == "bits" else value
            row["violations"] = self.violations(row)
            rows.append(row)
        return rows

    def violations(self, row: dict) -> list[str]:
        """Constraints (16)-(18) for one user's round; names of the violated ones."""
        out = []
        if self.cfg.tau_req_s > 0 and row["uplink_delay_s"] > self.cfg.tau_req_s:
            out.append("delay")
        if self.cfg.energy_budget_j > 0 and row["uplink_energy_j"] > self.cfg.energy_budget_j:
            out.append("energy")
        if self.cfg.uplink_power_w > self.cfg.p_max_w:
            out.append("power")
        return out


def round_totals(rows: list[dict], eta: float) -> dict:
    """Per-round totals over users, and the energy term of the objective (15)."""
    totals: dict = {}
    for direction in DIRECTIONS:
        for key in ("bits", "energy_j"):
            totals[f"{direction}_{key}"] = sum(r[f"{direction}_{key}"] for r in rows)
        totals[f"{direction}_delay_s"] = max((r[f"{direction}_delay_s"] for r in rows), default=0.0)
    totals["violations"] = sum(len(r["violations"]) for r in rows)
    totals["energy_term"] = eta * totals["uplink_energy_j"]
    return totals
