"""One objective per comparison: the points of a sweep that are compared must train on the same loss.

Points compared with each other are those with the same axis values (seed, SNR, alpha, ...) and a
different variant. Within such a group every method that states its objective
(``Method.objective``, semfl.objective) must train on the same task loss with the same optimiser
and learning rate as the group's first such point (PSFL in the PSFL studies), unless the variant's
name says how it differs (``semfl.objective.declares``: ``fedavg-ce0`` trains MSE only).
"""
from __future__ import annotations

from semfl.config import ConfigError
from semfl.methods import get_method
from semfl.objective import Objective, declares


def point_objective(point) -> Objective | None:
    """The objective a sweep point trains on (None: its method states none)."""
    cfg = point.config()
    return get_method(cfg.method).objective(cfg)


def objective_conflicts(sweep) -> list[str]:
    """One line per point that is compared with a reference point but trains on another objective
    without its variant name saying so; empty when the sweep compares like with like."""
    groups: dict[str, list] = {}
    for point in sweep.points:
        groups.setdefault("__".join(point.label.split("__")[1:]), []).append(point)
    problems = []
    for key, points in groups.items():
        reference = None
        for point in points:
            try:
                objective = point_objective(point)
            except ConfigError:
                continue  # an invalid point is reported by the sweep itself
            if objective is None:
                continue
            if reference is None:
                reference = (point.variant, objective)
                continue
            ref_name, ref = reference
            if not objective.comparable(ref) and not declares(point.variant, objective, ref):
                problems.append(f"{point.label}: trains on {objective.task} | {objective.optimiser}, but {ref_name} "
                                f"on {ref.task} | {ref.optimiser}; give it the same train.task_weight / optimizer / "
                                f"lr, or name the difference in the variant ({'-'.join(objective.tags())})")
    return problems
