"""PSFL's Personalized Local Distillation (PLD): PSFL eqs 19-25 and Algorithm 1.

Each user holds a **mentor** (its personalised GSC model, primed quantities ``'``) and a
**student** (the federated CSC model). On every batch both run at the same channel SNR and each is
updated by its own total loss:

* (19) ``L'_task = CE(y, y_hat') + MSE(m, m_hat')``;  (20) ``L_task = CE(y, y_hat) + MSE(m, m_hat)``,
  where ``y_hat' = softmax(classifier(m_hat'))``, ``y_hat = softmax(classifier(m_hat))`` and the
  classifier is the frozen task classifier (its parameters do not train, but the gradient flows
  through it into the reconstruction). CE and MSE are batch means (``F.cross_entropy``,
  ``F.mse_loss``).
* (21) ``L'_dis = KL_mentor / L_task`` and (22) ``L_dis = KL_student / L'_task``.
* (23) ``L'_sem = L_sem = [MSE(S', S) + MSE(C', C)] / (L'_task + L_task)``.
* (24) ``L'_total = L'_task + L'_dis + L'_sem``;  (25) ``L_total = L_task + L_dis + L_sem``.

Decisions where the paper is loose (reference/algorithms.md section 1):

**KL direction.** The paper writes ``KL(y_hat', y_hat)`` for the mentor and ``KL(y_hat, y_hat')``
for the student. We use the deep-mutual-learning form (Zhang et al. 2018, the paper's ref [28]
for mutual distillation): each model's distillation term is the KL divergence *from the other
model's detached distribution to its own prediction*, i.e. the model is pulled towards the
other's soft labels:

* mentor:  ``KL_mentor  = KL(y_hat.detach() || y_hat')  =
  F.kl_div(log_softmax(mentor_logits), softmax(student_logits).detach(), reduction='batchmean')``
* student: ``KL_student = KL(y_hat'.detach() || y_hat)  =
  F.kl_div(log_softmax(student_logits), softmax(mentor_logits).detach(), reduction='batchmean')``

This is the forward (cross-entropy-like, mass-covering) KL of standard knowledge distillation:
the gradient w.r.t. the own logits is simply ``p_own - p_target``. The target is detached
("KL targets are detached too", algorithms.md), so a model's distillation term never updates the
other model.

**Divisors are constants.** The divisor of (21)/(22) is the *other* model's task loss and the
divisor of (23) is ``L'_task + L_task``; all are detached: they weigh the distillation intensity
by how reliable the predictions are (the paper's stated purpose) and are not themselves
optimisation targets (otherwise a model could lower its loss by raising the other's task loss,
or its own task loss would get a negative gradient from the division).

**Semantic loss, two gradient views.** ``L'_sem`` and ``L_sem`` have the same value, but the
mentor's copy treats the student's ``S, C`` as detached targets and the student's copy treats
the mentor's ``S', C'`` as detached targets. Hence ``L'_total`` depends on mentor parameters
only and ``L_total`` on student parameters only, so one backward pass of their sum gives
exactly the two separate gradients (tests check this).

The float fields ``mentor_dis`` / ``student_dis`` / ``sem`` hold the divided values as they enter
the totals; ``mentor_kl`` / ``student_kl`` / ``sem_raw`` hold the undivided KL terms and
``MSE(S',S) + MSE(C',C)`` for logging.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

from semfl.config import TrainConfig
from semfl.models.base import SemanticOutput
from semfl.training import apply_masks, autocast, batches, clip_gradients, make_optimizer, snr_tensor


@dataclass
class PLDLosses:
    mentor_total: torch.Tensor  # (24), grads flow into the mentor only
    student_total: torch.Tensor  # (25), grads flow into the student only
    mentor_task: float  # (19)
    student_task: float  # (20)
    mentor_dis: float  # (21), after division by L_task
    student_dis: float  # (22), after division by L'_task
    sem: float  # (23), after division by L'_task + L_task
    mentor_ce: float
    student_ce: float
    mentor_mse: float
    student_mse: float
    mentor_kl: float = 0.0  # KL(y_hat.detach() || y_hat'), undivided
    student_kl: float = 0.0  # KL(y_hat'.detach() || y_hat), undivided
    sem_raw: float = 0.0  # MSE(S', S) + MSE(C', C), undivided

    def floats(self) -> dict[str, float]:
        """Every float term by name (the two totals as floats too)."""
        out = {"mentor_total": float(self.mentor_total.detach()), "student_total": float(self.student_total.detach())}
        for f in fields(self):
            if f.name not in out:
                out[f.name] = float(getattr(self, f.name))
        return out


def _kl_to(own_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target).detach() || softmax(own)), batch mean; gradient w.r.t. own only.

    In fp32 even under bf16 autocast: CPU autocast leaves (log_)softmax in bf16, whose rounding
    swamps a KL between close distributions (it even came out negative)."""
    return F.kl_div(F.log_softmax(own_logits.float(), dim=1), F.softmax(target_logits.float(), dim=1).detach(),
                    reduction="batchmean")


def pld_losses(mentor_out: SemanticOutput, student_out: SemanticOutput, images: torch.Tensor,
               labels: torch.Tensor, classifier: nn.Module, ce_weight: float = 1.0,
               dis_weight: float = 1.0, sem_weight: float = 1.0) -> PLDLosses:
    """PSFL eqs 19-25 on one batch (see the module docstring for the KL direction and detaching).

    ``ce_weight`` scales the CE term of the task losses (19)-(20), ``dis_weight`` the distillation
    losses (21)-(22) and ``sem_weight`` the semantic loss (23) in the totals; all 1.0 is the paper's loss.
    """
    if mentor_out.S.shape != student_out.S.shape or mentor_out.C.shape != student_out.C.shape:
        raise ValueError(f"PLD: mentor and student must expose S and C of the same shape, got "
                         f"S {tuple(mentor_out.S.shape)} vs {tuple(student_out.S.shape)}, "
                         f"C {tuple(mentor_out.C.shape)} vs {tuple(student_out.C.shape)}")
    m_logits = classifier(mentor_out.recon)
    s_logits = classifier(student_out.recon)

    m_ce = F.cross_entropy(m_logits, labels)
    s_ce = F.cross_entropy(s_logits, labels)
    m_mse = F.mse_loss(mentor_out.recon, images)
    s_mse = F.mse_loss(student_out.recon, images)
    m_task = ce_weight * m_ce + m_mse  # (19)
    s_task = ce_weight * s_ce + s_mse  # (20)
    m_task_c, s_task_c = m_task.detach(), s_task.detach()

    m_kl = _kl_to(m_logits, s_logits)
    s_kl = _kl_to(s_logits, m_logits)
    m_dis = m_kl / s_task_c  # (21)
    s_dis = s_kl / m_task_c  # (22)

    sem_div = m_task_c + s_task_c  # (23) divisor, constant
    m_sem_raw = F.mse_loss(mentor_out.S, student_out.S.detach()) + F.mse_loss(mentor_out.C, student_out.C.detach())
    s_sem_raw = F.mse_loss(mentor_out.S.detach(), student_out.S) + F.mse_loss(mentor_out.C.detach(), student_out.C)
    m_sem = m_sem_raw / sem_div
    s_sem = s_sem_raw / sem_div

    mentor_total = m_task + dis_weight * m_dis + sem_weight * m_sem  # (24)
    student_total = s_task + dis_weight * s_dis + sem_weight * s_sem  # (25)
    return PLDLosses(
        mentor_total=mentor_total, student_total=student_total,
        mentor_task=float(m_task_c), student_task=float(s_task_c),
        mentor_dis=float(m_dis.detach()), student_dis=float(s_dis.detach()), sem=float(s_sem.detach()),
        mentor_ce=float(m_ce.detach()), student_ce=float(s_ce.detach()),
        mentor_mse=float(m_mse.detach()), student_mse=float(s_mse.detach()),
        mentor_kl=float(m_kl.detach()), student_kl=float(s_kl.detach()), sem_raw=float(s_sem_raw.detach()),
    )


def pld_step(mentor: nn.Module, student: nn.Module, mentor_opt: torch.optim.Optimizer,
             student_opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
             classifier: nn.Module, snr_db: float,
             student_masks: dict[str, torch.Tensor] | None = None, grad_clip: float = 0.0,
             ce_weight: float = 1.0, dis_weight: float = 1.0, sem_weight: float = 1.0,
             precision: str = "fp32") -> PLDLosses:
    """One inner step of Algorithm 1: both models at the same SNR, both updated by their totals.

    A single backward of ``L'_total + L_total`` gives each model exactly its own gradient (the
    cross terms are detached), so neither backward frees a graph the other needs. After the
    steps the student's pruning masks are re-applied so pruned weights stay exactly 0.
    """
    snr = snr_tensor(snr_db, len(images), images.device)
    with autocast(precision, images.device):
        mentor_out = mentor(images, snr)
        student_out = student(images, snr)
        losses = pld_losses(mentor_out, student_out, images, labels, classifier, ce_weight, dis_weight, sem_weight)
    mentor_opt.zero_grad(set_to_none=True)
    student_opt.zero_grad(set_to_none=True)
    (losses.mentor_total + losses.student_total).backward()
    clip_gradients(mentor, grad_clip)
    clip_gradients(student, grad_clip)
    mentor_opt.step()
    student_opt.step()
    if student_masks:
        apply_masks(dict(student.named_parameters()), student_masks)
    return losses


def pld_train(mentor: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
              snr_db: float, classifier: nn.Module, generator: torch.Generator,
              student_masks: dict[str, torch.Tensor] | None = None, mentor_lr: float | None = None,
              mentor_opt_state: dict | None = None, ce_weight: float = 1.0, dis_weight: float = 1.0,
              sem_weight: float = 1.0) -> dict:
    """Algorithm 1: ``cfg.local_epochs`` epochs of PLD over (x, y) at one channel SNR.

    The student's optimiser is fresh every call (its weights come from the broadcast, as in
    ``training.local_train``); the mentor's may persist across rounds: pass the state returned
    as ``'mentor_opt_state'`` by the previous call. ``mentor_lr`` defaults to ``cfg.lr``.
    The frozen classifier is put in eval mode. With ``student_masks`` the masked student weights
    are zeroed before training and held at zero after every step.

    Returns the sample-weighted means of every loss term (``PLDLosses.floats()`` names) over all
    steps, ``'steps'``, ``'samples'`` and ``'mentor_opt_state'``.
    """
    mentor.train()
    student.train()
    classifier.eval()
    mentor_opt = make_optimizer(mentor.parameters(), cfg, lr=mentor_lr)
    if mentor_opt_state:
        mentor_opt.load_state_dict(mentor_opt_state)
    student_opt = make_optimizer(student.parameters(), cfg)
    if student_masks:
        apply_masks(dict(student.named_parameters()), student_masks)
    sums: dict[str, float] = {}
    count, steps = 0, 0
    for _ in range(cfg.local_epochs):
        for idx in batches(len(x), cfg.batch_size, generator):
            images, labels = x[idx], y[idx]
            losses = pld_step(mentor, student, mentor_opt, student_opt, images, labels, classifier, snr_db,
                              student_masks, cfg.grad_clip, ce_weight, dis_weight, sem_weight, cfg.precision)
            for name, value in losses.floats().items():
                sums[name] = sums.get(name, 0.0) + value * len(idx)
            count += len(idx)
            steps += 1
    out: dict = {name: total / max(count, 1) for name, total in sums.items()}
    out["steps"] = steps
    out["samples"] = count
    out["mentor_opt_state"] = mentor_opt.state_dict()
    return out
