"""What a method trains on: its loss terms, optimiser and learning rate, stated so studies can compare them.

Every semantic method here trains the reconstruction + task loss of PSFL eq 20,
``mse + w * CE(classifier(recon), y)``, possibly plus terms of its own (PSFL's student adds the
distillation and semantic losses of eqs 22-23). Two methods compared on the classifier's accuracy of
their reconstructions are only comparable when that shared part (``task``) and the optimiser and
learning rate (``optimiser``) agree; their extra terms are what the methods are. A method states its
objective with ``Method.objective(cfg)``; the runner writes it into metrics row 0 and summary.json.

A study that compares methods under different objectives on purpose names the difference in the
variant's name (:func:`declares`): ``ce0`` for an MSE-only objective, ``ce1`` for unit CE weight,
``sgd0.05`` for SGD at learning rate 0.05, e.g. ``fedavg-ce0``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Objective:
    ce_weight: float  # w of mse + w * CE(classifier)
    optimizer: str  # "sgd" | "adam"
    lr: float
    extra: tuple[str, ...] = field(default_factory=tuple)  # the method's own terms, described
    base: str = ""  # a task loss other than eq 20's, e.g. the split family's CE of its own head

    @property
    def task(self) -> str:
        """The reconstruction + task loss, e.g. ``mse + 0.01*CE(classifier)`` (``mse`` when w = 0), or
        ``base`` for a method that trains another task (the split family classifies)."""
        if self.base:
            return self.base
        return "mse" if self.ce_weight == 0 else f"mse + {self.ce_weight:g}*CE(classifier)"

    @property
    def optimiser(self) -> str:
        return f"{self.optimizer} lr={self.lr:g}"

    def describe(self) -> str:
        """The whole training loss and optimiser, e.g. ``mse + 0.01*CE(classifier) + 0.001*KL | adam lr=0.002``."""
        return " + ".join((self.task,) + self.extra) + " | " + self.optimiser

    def tags(self) -> tuple[str, str]:
        """The words a variant name uses to say it trains on this objective: ``ce<w>``, ``<opt><lr>``."""
        return f"ce{self.ce_weight:g}", f"{self.optimizer}{self.lr:g}"

    def comparable(self, other: "Objective") -> bool:
        """Same task loss, optimiser and learning rate (the terms accuracy comparisons rest on)."""
        return (self.ce_weight, self.base, self.optimizer, self.lr) == (other.ce_weight, other.base, other.optimizer,
                                                                        other.lr)

    def fields(self) -> dict[str, str]:
        """The metrics/summary fields: ``train_objective`` (all terms), ``task_objective``, ``optimiser``."""
        return {"train_objective": self.describe(), "task_objective": self.task, "optimiser": self.optimiser}


def declares(name: str, objective: Objective, reference: Objective) -> bool:
    """Whether a variant named ``name`` says how its objective differs from ``reference``'s: it names
    the differing CE weight (``ce<w>``) and/or optimiser and rate (``<opt><lr>``) as dash-separated words."""
    words = set(name.split("-"))
    ce_tag, opt_tag = objective.tags()
    ok = True
    if objective.ce_weight != reference.ce_weight:
        ok = ok and ce_tag in words
    if (objective.optimizer, objective.lr) != (reference.optimizer, reference.lr):
        ok = ok and opt_tag in words
    return ok
