"""PSFL (Peng et al.): personal GSC mentors distil into one shared CSC student (PLD, Algorithm 1);
the base station prunes the aggregated student by the users' SNRs of the round (AGP, Algorithm 2).

Round t at the base station:
  zeta_t from eq 26 on the users' SNRs of round t (clipped to zeta_max, raw value logged);
  prune (zeta_t > pruned fraction) or regrow (zeta_t smaller) the global student;
  broadcast it with the sparse codec; each user runs PLD with its mentor, keeping the mask fixed,
  and uploads its sparse student update; aggregation by eq 10 (data-size weights).
Regrown positions are given a small random value (the kept layer's smallest magnitude, random
sign) instead of an exact 0, so the support of the broadcast model *is* the mask and users
recover it from the payload without a separate bitmap ("add weights randomly", Algorithm 2).
Privacy options (off by default): (eps, delta)-DP on clipped student updates (semfl.methods.psfl.privacy) and
secure aggregation with X25519 key agreement and dropout recovery (semfl.protocol.secagg); threat
models in docs/security.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from semfl.methods.psfl import agp as pruning
from semfl.wireless.codecs import Payload
from semfl.config import ConfigError, option, register_table
from semfl.methods.foundation import foundation_weights, start_from_foundation
from semfl.methods.aggregation import Aggregator
from semfl.protocol.method import Method, register_method
from semfl.methods.common import build_semantic_model, finish_semantic, train_snr
from semfl import rng
from semfl.objective import Objective
from semfl.methods.psfl.pld import pld_train
from semfl.methods.psfl.privacy import DPConfig, PrivacyAccountant, privatize
from semfl.protocol import secagg
from semfl.protocol.secagg_round import masked_reply, secure_sum, split_request
from semfl.protocol import seeding
from semfl.protocol.context import UserContext
from semfl.training import evaluate_semantic, load_weights, weights_of

MENTORS = ("gsc-m", "gsc-l", "gsc-h")


@dataclass
class PSFLOptions:
    mentor_rule: str = option("rank", "rank: Table I shares by data size (3/9 M, 4/9 L, 2/9 H); thresholds: by size")
    mentor_thresholds: list[int] = option(factory=lambda: [4600, 7400], doc="size < t0 -> M, < t1 -> L, else H; the defaults sit midway between Table I's groups (4429 | 4783, 5891 | 8958), so they give its 3/4/2 split on its sizes; in Table I samples, scaled by data.user_fraction; a run where they give every user the same mentor stops with an error naming the fields")
    mentors: list[str] = option(factory=list, doc="per-user override, e.g. [\"gsc-m\", \"gsc-h\", ...]")
    pld: bool = option(True, "False = ablation \"w/o PLD\": every user takes GSC-M as mentor")
    agp: bool = option(True, "False = ablation \"w/o AGP\": no pruning")
    zeta_max: float = option(0.9, "upper clip of the pruned fraction zeta_t of AGP (eq 26)")
    prune_scope: str = option("global", "global | layer")
    mentor_lr: float = option(0.0, "0 = train.lr")
    ce_weight: float = option(1.0, "weight of the classifier CE in the task losses (19)-(20); 1 = the paper")
    dis_weight: float = option(1.0, "weight of the distillation losses (21)-(22) in the totals; 1 = the paper")
    sem_weight: float = option(1.0, "weight of the semantic loss (23) in the totals; 1 = the paper")
    mentor_checkpoint: str = option("", "checkpoint to initialise every mentor: `semfl pretrain`'s output or an MAE checkpoint (official key layout)")
    pretrain_epochs: int = option(0, "MAE-pretrain each mentor on its user's data before federated training")
    user_eval_samples: int = option(500, "test images for each user's mentor/student evaluation")
    dp: bool = option(False, "differential privacy: clip each user's update and add Gaussian noise")
    dp_clip_norm: float = option(1.0, "L2 clipping norm of a user's update under psfl.dp")
    dp_noise_multiplier: float = option(1.0, "Gaussian noise std / clip norm (z) under psfl.dp")
    dp_delta: float = option(1e-5, "delta of the reported (epsilon, delta)-DP guarantee")
    dp_noise_source: str = option("seed", "seed: DP noise drawn from the run's seed (reproducible; whoever holds the config and seed, e.g. the base station, can recompute and subtract it); os: from the operating system's randomness (docs/security.md)")
    secure_aggregation: bool = option(False, "SecAgg (X25519 pairwise masks, self-masks, Shamir-shared secrets): the base station sees only the sum of updates (docs/security.md)")
    secagg_frac_bits: int = option(24, "fixed-point fraction bits of the masked updates (64-bit ring)")
    secagg_threshold: float = option(0.6, "t = max(2, ceil(secagg_threshold * n)) of the n participants must survive to unmask")

    def validate(self, cfg) -> None:
        if self.mentor_rule not in ("rank", "thresholds"):
            raise ConfigError(f"psfl.mentor_rule: expected 'rank' or 'thresholds', got {self.mentor_rule!r}")
        if self.mentors and len(self.mentors) != cfg.users:
            raise ConfigError(f"psfl.mentors: needs one mentor per user ({cfg.users}), got {len(self.mentors)}")
        bad = [m for m in self.mentors if m not in MENTORS]
        if bad:
            raise ConfigError(f"psfl.mentors: unknown mentor {bad[0]!r} (allowed: {', '.join(MENTORS)})")
        if not 0 <= self.zeta_max < 1:
            raise ConfigError(f"psfl.zeta_max: must be in [0, 1), got {self.zeta_max}")
        if self.prune_scope not in ("global", "layer"):
            raise ConfigError(f"psfl.prune_scope: expected 'global' or 'layer', got {self.prune_scope!r}")
        if len(self.mentor_thresholds) != 2 or self.mentor_thresholds[0] > self.mentor_thresholds[1]:
            raise ConfigError("psfl.mentor_thresholds: expected two increasing sizes [M/L, L/H]")
        if self.dp_noise_source not in ("seed", "os"):
            raise ConfigError(f"psfl.dp_noise_source: expected 'seed' or 'os', got {self.dp_noise_source!r}")
        if not 0 < self.secagg_threshold <= 1:
            raise ConfigError(f"psfl.secagg_threshold: must be in (0, 1], got {self.secagg_threshold}")
        if not 1 <= self.secagg_frac_bits <= 52:
            raise ConfigError(f"psfl.secagg_frac_bits: must be in [1, 52], got {self.secagg_frac_bits}")
        if self.secure_aggregation and cfg.table("aggregation").rule != "mean":
            raise ConfigError(f"aggregation.rule: {cfg.table('aggregation').rule!r} needs each user's update, but "
                              "psfl.secure_aggregation shows the base station only their sum: use 'mean'")
        if self.dp and (self.dp_clip_norm <= 0 or self.dp_noise_multiplier <= 0):
            raise ConfigError("psfl.dp_clip_norm / psfl.dp_noise_multiplier: must be > 0 when psfl.dp is on")


register_table("psfl", PSFLOptions)


def choose_mentors(sizes: list[int], options: PSFLOptions, user_fraction: float = 1.0) -> list[str]:
    """Each user's mentor from its resources (local data size), PSFL Table I, or the per-user override.
    ``user_fraction``: data.user_fraction, the share of its volume each user holds (the thresholds are
    in full volumes, so they are scaled by it)."""
    if not options.pld:
        return ["gsc-m"] * len(sizes)
    if options.mentors:
        return list(options.mentors)
    if options.mentor_rule == "thresholds":
        low, high = (t * user_fraction for t in options.mentor_thresholds)
        mentors = ["gsc-m" if s < low else "gsc-l" if s < high else "gsc-h" for s in sizes]
        if len(sizes) > 1 and len(set(mentors)) == 1:
            raise ConfigError(
                f"psfl.mentor_thresholds: {options.mentor_thresholds} (x data.user_fraction {user_fraction:g} = "
                f"[{low:g}, {high:g}] samples) give every user {mentors[0]} for user sizes {min(sizes)}-{max(sizes)}; "
                "change psfl.mentor_thresholds, data.user_fraction or data.max_per_user, or use "
                "psfl.mentor_rule = 'rank' or psfl.mentors")
        return mentors
    # rank: the smallest third -> M, the largest 2/9 -> H, the rest -> L (3/4/2 of 9 users)
    k = len(sizes)
    n_m, n_h = round(k * 3 / 9), round(k * 2 / 9)
    order = sorted(range(k), key=lambda u: (sizes[u], u))
    mentors = ["gsc-l"] * k
    for rank, user in enumerate(order):
        if rank < n_m:
            mentors[user] = "gsc-m"
        elif rank >= k - n_h:
            mentors[user] = "gsc-h"
    return mentors


@register_method
class PSFL(Method):
    name = "psfl"
    tables = ("psfl", "foundation", "aggregation")

    def __init__(self, run, transport):
        super().__init__(run, transport)
        self.options: PSFLOptions = self.cfg.table("psfl")
        self.student = build_semantic_model(run, self.cfg.model.arch)  # one working student
        start_from_foundation(run, self.student, self.cfg.model.arch, lambda: build_semantic_model(run, self.cfg.model.arch))
        self.global_weights = weights_of(self.student)
        self.masks: dict[str, torch.Tensor] | None = None
        self.prune_ratio = 0.0
        self.mentor_of = choose_mentors(run.user_sizes, self.options, self.cfg.data.user_fraction)
        self._mentors: dict[str, torch.nn.Module] = {}  # one working mentor per architecture
        self.user_rows: dict[int, dict] = {}
        self.accountant = None
        if self.options.dp:
            # participants are a fixed-size draw (runtime.run.participants), not Poisson sampling, so
            # no amplification by sampling is claimed: q = 1 bounds every round (privacy.py's doc)
            self.accountant = PrivacyAccountant(self.options.dp_noise_multiplier, self.options.dp_delta, 1.0)
        run.log("mentors: " + ", ".join(f"u{k}={m}" for k, m in enumerate(self.mentor_of)))
        if transport.workers > 1 and self.cfg.table("foundation").samples:
            # loaded (or pretrained) once here, where forked workers inherit them, not once per worker
            for arch in sorted(set(self.mentor_of)):
                foundation_weights(run, arch, lambda arch=arch: build_semantic_model(run, arch))

    @classmethod
    def objective(cls, cfg) -> Objective:
        """The student's loss (eq 25): its task loss (20) mse + ce_weight * CE, plus the weighted
        distillation (22) and semantic (23) terms; train.optimizer at train.lr (the mentors' own rate
        is psfl.mentor_lr, but mentors are not what is compared)."""
        o: PSFLOptions = cfg.table("psfl")
        terms = ((o.dis_weight, "KL(mentor||student)/task'"), (o.sem_weight, "sem(mentor,student)/(task+task')"))
        extra = tuple(f"{w:g}*{term}" for w, term in terms if w)
        return Objective(o.ce_weight, cfg.train.optimizer, cfg.train.lr, extra)

    # ---------------------------------------------------------------- users

    def handlers(self):
        handlers = {"train": self.user_train}
        if self.options.secure_aggregation:
            handlers.update({secagg.KEYS: self.user_secagg_keys, secagg.SHARES: self.user_secagg_shares,
                             secagg.UNMASK: self.user_secagg_unmask})
        return handlers

    def user_secagg_keys(self, ctx: UserContext, payload: Payload) -> Payload:
        return Payload(secagg.user_keys(ctx.state), codec="dense")

    def user_secagg_shares(self, ctx: UserContext, payload: Payload) -> Payload:
        return Payload(secagg.user_shares(ctx.state, ctx.user, payload.tensors, payload.meta["t"]), codec="dense")

    def user_secagg_unmask(self, ctx: UserContext, payload: Payload) -> Payload:
        return Payload(secagg.user_unmask(ctx.state, ctx.user, payload.meta["survivors"], payload.meta["dropped"]),
                       codec="dense")

    def mentor_model(self, arch: str) -> torch.nn.Module:
        if arch not in self._mentors:
            self._mentors[arch] = build_semantic_model(self.run, arch)
        return self._mentors[arch]

    def _init_mentor(self, ctx: UserContext, arch: str) -> dict[str, torch.Tensor]:
        from semfl.models.gsc import load_mae_checkpoint, pretrain_mae

        rng.manual_seed(seeding.derive_seed(self.cfg.seed, "mentor", ctx.user))
        fresh = build_semantic_model(self.run, arch)
        if self.cfg.table("foundation").samples:  # mentors arrive pretrained (semfl.methods.foundation)
            load_weights(fresh, foundation_weights(self.run, arch, lambda: build_semantic_model(self.run, arch)))
        if self.options.mentor_checkpoint:
            load_mae_checkpoint(fresh, self.options.mentor_checkpoint, strict_shapes=False)
        if self.options.pretrain_epochs:
            pretrain_mae(fresh, ctx.x, self.options.pretrain_epochs, self.cfg.train.batch_size, 1e-3,
                         seed=seeding.derive_seed(self.cfg.seed, "pretrain", ctx.user))
        return {k: v.detach().cpu() for k, v in weights_of(fresh).items()}

    def user_train(self, ctx: UserContext, payload: Payload) -> Payload:
        arch = self.mentor_of[ctx.user]
        if "mentor" not in ctx.state:
            ctx.state["mentor"] = self._init_mentor(ctx, arch)
        mentor = self.mentor_model(arch)
        load_weights(mentor, ctx.state["mentor"])
        weights, _ = split_request(payload)  # without the secure-aggregation shares it may carry
        load_weights(self.student, weights)
        masks = {k: (v != 0).to(v.dtype) for k, v in weights.items() if pruning.prunable(k, v)} \
            if payload.meta.get("pruned") else None
        stats = pld_train(mentor, self.student, ctx.x, ctx.y, self.cfg.train, train_snr(self.cfg, ctx),
                          self.run.classifier, ctx.generator("batches"), student_masks=masks,
                          mentor_lr=self.options.mentor_lr or None, mentor_opt_state=ctx.state.get("mentor_opt"),
                          ce_weight=self.options.ce_weight, dis_weight=self.options.dis_weight,
                          sem_weight=self.options.sem_weight)
        ctx.state["mentor"] = {k: v.detach().cpu() for k, v in weights_of(mentor).items()}
        if stats.get("mentor_opt_state") is not None:
            ctx.state["mentor_opt"] = stats.pop("mentor_opt_state")
        stats.pop("mentor_opt_state", None)
        meta = {"num_samples": ctx.num_samples, **{k: float(v) for k, v in stats.items()}}
        if self.options.dp:
            # ε covers the privatised update only: training losses, test metrics of models trained on
            # the user's data and the update's norm would be releases it does not account for
            meta = {"num_samples": ctx.num_samples}
        elif payload.meta.get("evaluate"):
            n = self.options.user_eval_samples or len(self.run.test_y)
            tx, ty = self.run.test_x[:n], self.run.test_y[:n]
            for role, model in (("mentor", mentor), ("student", self.student)):
                result = evaluate_semantic(model, self.run.classifier, tx, ty, self.cfg.eval.snr_db, self.cfg.eval.batch_size)
                meta[f"{role}_loss"], meta[f"{role}_accuracy"] = result["loss"], result["accuracy"]
                meta[f"{role}_psnr_db"] = result["psnr_db"]
        trained = weights_of(self.student)
        update = {k: trained[k] - weights[k] for k in weights}
        return self._upload(ctx, update, masks, meta, payload)

    def _upload(self, ctx: UserContext, update, masks, meta, request: Payload) -> Payload:
        o = self.options
        if o.dp:
            dp = DPConfig(enabled=True, clip_norm=o.dp_clip_norm, noise_multiplier=o.dp_noise_multiplier, delta=o.dp_delta)
            generator = ctx.generator("dp") if o.dp_noise_source == "seed" else \
                torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
            update, _ = privatize(update, dp, len(self.run.parts), generator)
            update = pruning.apply(update, masks)  # the mask is public: noise off the support carries nothing
        if o.secure_aggregation:  # weighted by N_u / ΣN, fixed point, masked: protocol.secagg
            return masked_reply(ctx.state, ctx.user, request, update, ctx.num_samples, o.secagg_frac_bits, meta)
        return Payload(update, codec="sparse", meta=meta)

    def expected_reply(self, kind: str) -> dict[str, torch.Tensor] | None:
        """A train reply is the student update: one float tensor per global weight (under secure
        aggregation, one int64 tensor of masked ring elements); key replies are two X25519 keys."""
        if kind == secagg.KEYS:
            return {name: torch.empty(32, dtype=torch.uint8, device="meta") for name in ("c_pk", "s_pk")}
        if kind != "train":
            return None  # the other protocol replies are checked by protocol.secagg_round
        dtype = (lambda v: torch.int64) if self.options.secure_aggregation else (lambda v: v.dtype)
        return {k: torch.empty(v.shape, dtype=dtype(v), device="meta") for k, v in self.global_weights.items()}

    # --------------------------------------------------------- base station
    def _prune(self, round_: int) -> dict[str, Any]:
        if not self.options.agp:
            return {"prune_ratio": 0.0}
        snrs = self.run.link.snrs_db(round_)
        zeta, raw = pruning.prune_ratio(snrs, self.cfg.link.snr_min_db, self.cfg.link.snr_max_db, self.options.zeta_max)
        generator = seeding.generator(self.cfg.seed, round_, "regrow")
        old = self.masks
        self.masks, info = pruning.update_masks(self.global_weights, old, zeta, self.options.prune_scope, generator)
        weights = pruning.apply(self.global_weights, self.masks)
        if old is not None and info.get("regrown"):
            for name, mask in self.masks.items():
                grown = (mask > 0) & (old[name] == 0)
                if grown.any():
                    kept = weights[name][(mask > 0) & ~grown].abs()
                    scale = float(kept.min()) if kept.numel() else 1e-3
                    signs = torch.randint(0, 2, (int(grown.sum()),), generator=generator).to(weights[name].dtype) * 2 - 1
                    weights[name][grown] = signs * max(scale, 1e-8)
        self.global_weights = weights
        self.prune_ratio = info["ratio"]
        return {"prune_ratio": info["ratio"], "prune_ratio_target": zeta, "prune_ratio_raw": raw,
                "pruned_weights": info["pruned"], "prunable_weights": info["total"], "regrown": info.get("regrown", 0)}

    def run_round(self, round_: int, users: list[int]) -> dict[str, Any]:
        info = self._prune(round_)
        due = self.cfg.evaluates(round_)
        meta = {"pruned": bool(self.options.agp), "evaluate": due}
        request = Payload(self.global_weights, codec="sparse" if self.options.agp else "dense", meta=meta)
        average = Aggregator(self.cfg.table("aggregation"))  # replies are updates: no reference
        self.user_rows = {}

        def collect(user: int, reply: Payload) -> None:
            if not self.options.secure_aggregation:
                average.add(reply.tensors, reply.meta["num_samples"])
            self.user_rows[user] = {"user": user, "mentor": self.mentor_of[user],
                                    **{k: v for k, v in reply.meta.items() if k != "num_samples"}}

        if self.options.secure_aggregation:
            o = self.options
            mean_update, secure = secure_sum(self.transport, users, request, self.global_weights, self.run.user_sizes,
                                             o.secagg_threshold, o.secagg_frac_bits, self.run.log, on_reply=collect)
            info.update(secure)
        else:
            self.transport.send(users, "train", request, on_reply=collect)
            mean_update = average.result(self.global_weights)
        if mean_update is not None:  # None: a secure-aggregation round skipped (logged); the model stays
            self.global_weights = {k: self.global_weights[k] + mean_update[k].to(self.global_weights[k].dtype)
                                   for k in self.global_weights}
        if self.masks is not None:
            self.global_weights = pruning.apply(self.global_weights, self.masks)
        if self.accountant is not None:  # a skipped round is counted too (conservative)
            self.accountant.step()
            info["epsilon"] = self.accountant.epsilon()
        info["user_rows"] = list(self.user_rows.values())
        return info

    def evaluate(self, round_: int) -> list[dict[str, Any]]:
        load_weights(self.student, self.global_weights)
        row = evaluate_semantic(self.student, self.run.classifier, self.run.test_x, self.run.test_y,
                                self.cfg.eval.snr_db, self.cfg.eval.batch_size)
        return [{"scope": "global", **row}]

    def state_dict(self) -> dict[str, Any]:
        return {"global_weights": self.global_weights, "masks": self.masks, "prune_ratio": self.prune_ratio,
                "accountant": self.accountant.state_dict() if self.accountant else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_weights = state["global_weights"]
        self.masks = state["masks"]
        self.prune_ratio = state["prune_ratio"]
        if self.accountant is not None and state.get("accountant"):
            self.accountant.load_state_dict(state["accountant"])

    @classmethod
    def trained_models(cls, run, state, user_state):
        def student():
            model = build_semantic_model(run, run.cfg.model.arch)
            load_weights(model, state["global_weights"])
            return model

        def mentor(user: int):
            def build():
                held = user_state(user, ["mentor"])
                if not held or "mentor" not in held:
                    raise LookupError(f"user {user} holds no mentor in this checkpoint (it has not trained yet)")
                model = build_semantic_model(run, mentor_of[user])
                load_weights(model, held["mentor"])
                return model
            return build

        mentor_of = choose_mentors(run.user_sizes, run.cfg.table("psfl"))
        return {"global": student, **{f"mentor:{k}": mentor(k) for k in range(run.cfg.users)}}

    def finish(self, out_dir) -> dict[str, Any]:
        load_weights(self.student, self.global_weights)
        models: dict[str, torch.nn.Module] = {"student (CSC)": self.student}
        # one mentor per architecture, from the first user that holds it (the paper's Figs 4-7)
        for arch in dict.fromkeys(self.mentor_of):
            user = self.mentor_of.index(arch)
            state = (self.transport.fetch_state(user, ["mentor"]) or {}).get("mentor")  # None: node gone
            if state is not None:
                mentor = build_semantic_model(self.run, arch)
                load_weights(mentor, state)
                models[f"mentor u{user} ({arch.upper()})"] = mentor
        finish_semantic(self.run, models, out_dir)
        return {"mentors": ",".join(self.mentor_of), "final_prune_ratio": self.prune_ratio,
                **({"epsilon": self.accountant.epsilon()} if self.accountant else {})}
