"""How the base station combines the users' replies: the weighted mean, or a robust rule.

Config table ``[aggregation]`` (methods fedavg, fedpaq, fttq, stc, topk and psfl):

* ``rule = "mean"`` (default): the weighted mean (PSFL eq 10), as a running sum: no K updates held.
* ``"median"``: the coordinate-wise median of the updates (Yin et al. 2018), unweighted.
* ``"trimmed_mean"``: per coordinate, drop the ``ceil(trim_fraction * K)`` largest and smallest
  values and average the rest (unweighted; at least one value is kept).
* ``"norm_bounded"``: each update's L2 norm is clipped to ``norm_bound`` × the round's median
  update norm, then the weighted mean is taken (Sun et al. 2019 with a data-driven bound).

The robust rules hold the round's K updates (one float64 copy each). An update is a reply minus
``reference`` (the global weights, for methods whose users reply with their weights), so norms are
those of the users' changes. They bound what a minority of users can do to one round: the median
and trimmed mean tolerate fewer than half (trimmed: the trimmed count) of arbitrarily bad replies;
norm bounding limits each reply's influence to the median's size but lets every user pull in its
own direction. None of them can work on a secure aggregate (the base station sees only the sum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from semfl.config import ConfigError, option, register_table

RULES = ("mean", "median", "trimmed_mean", "norm_bounded")
METHODS = ("fedavg", "fedpaq", "fttq", "stc", "topk", "psfl")  # whose base station aggregates here


@dataclass
class AggregationOptions:
    rule: str = option("mean", "mean | median | trimmed_mean | norm_bounded (docs/security.md)")
    trim_fraction: float = option(0.1, "trimmed_mean: the fraction cut at each end (rounded up to whole users)")
    norm_bound: float = option(1.0, "norm_bounded: the clip norm as a multiple of the round's median update norm")

    def validate(self, cfg) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"aggregation.rule: expected one of {', '.join(RULES)}, got {self.rule!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"aggregation.trim_fraction: must be in [0, 0.5), got {self.trim_fraction}")
        if self.norm_bound <= 0:
            raise ConfigError(f"aggregation.norm_bound: must be > 0, got {self.norm_bound}")
        if self.rule != "mean" and cfg.method not in METHODS:
            raise ConfigError(f"aggregation.rule: {self.rule!r} is available for {', '.join(METHODS)}, "
                              f"not for method {cfg.method!r}")


register_table("aggregation", AggregationOptions)


class Aggregator:
    """Collects weighted replies (``add``) and combines them by the rule (``result``)."""

    def __init__(self, options: AggregationOptions | None = None, reference: dict[str, torch.Tensor] | None = None):
        self.options = options or AggregationOptions()
        self.reference = reference
        self.updates: list[dict[str, torch.Tensor]] = []
        self.weights: list[float] = []
        self.sum: dict[str, torch.Tensor] | None = None
        self.weight = 0.0

    def add(self, tensors: dict[str, torch.Tensor], weight: float) -> None:
        if self.options.rule == "mean":  # a running sum, as the performance principles ask
            if self.sum is None:
                self.sum = {k: v.detach().to(torch.float64) * weight for k, v in tensors.items()}
            else:
                for k, v in tensors.items():
                    self.sum[k].add_(v.detach().to(torch.float64), alpha=weight)
            self.weight += weight
            return
        ref = self.reference or {}
        self.updates.append({k: v.detach().to(torch.float64) - (ref[k].to(v.device, torch.float64) if k in ref else 0)
                             for k, v in tensors.items()})
        self.weights.append(float(weight))

    def __len__(self) -> int:
        return len(self.updates) if self.options.rule != "mean" else int(self.sum is not None)

    def result(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The combined reply, in ``like``'s dtypes (the reference added back where one was given)."""
        if self.options.rule == "mean":
            if self.sum is None:
                raise RuntimeError("no replies to aggregate")
            return {k: (self.sum[k] / self.weight).to(like[k].dtype) for k in self.sum}
        if not self.updates:
            raise RuntimeError("no replies to aggregate")
        combined = getattr(self, "_" + self.options.rule)()
        ref = self.reference or {}
        return {k: (v + (ref[k].to(v.device, torch.float64) if k in ref else 0)).to(like[k].dtype)
                for k, v in combined.items()}

    def _stacked(self, name: str) -> torch.Tensor:
        return torch.stack([u[name] for u in self.updates])

    def _median(self) -> dict[str, torch.Tensor]:
        # the mean of the two middle values for an even count (torch.median would take the lower one)
        count = len(self.updates)
        out = {}
        for k in self.updates[0]:
            ordered = self._stacked(k).sort(dim=0).values
            out[k] = (ordered[(count - 1) // 2] + ordered[count // 2]) / 2
        return out

    def _trimmed_mean(self) -> dict[str, torch.Tensor]:
        count = len(self.updates)
        cut = min(math.ceil(self.options.trim_fraction * count), (count - 1) // 2)
        out = {}
        for k in self.updates[0]:
            ordered = self._stacked(k).sort(dim=0).values
            out[k] = ordered[cut:count - cut].mean(dim=0)
        return out

    def _norm_bounded(self) -> dict[str, torch.Tensor]:
        norms = torch.tensor([math.sqrt(sum(float(v.pow(2).sum()) for v in u.values())) for u in self.updates])
        ordered = norms.sort().values
        bound = self.options.norm_bound * float(ordered[(len(norms) - 1) // 2] + ordered[len(norms) // 2]) / 2
        total = sum(self.weights)
        out = {k: torch.zeros_like(v) for k, v in self.updates[0].items()}
        for update, norm, weight in zip(self.updates, norms.tolist(), self.weights):
            scale = weight / total * (1.0 if norm <= bound or norm == 0 else bound / norm)
            for k, v in update.items():
                out[k].add_(v, alpha=scale)
        return out
