"""Use a trained model: load a run directory's models and send images through them.

``semfl.load(run_dir, model="global")`` reads a run directory (config.toml, checkpoint/,
metrics.jsonl; written by ``semfl run`` or by a Flower deployment) and returns a
:class:`SemanticCodec`: ``encode`` (images -> power-normalised complex symbols), ``channel``
(AWGN or Rayleigh at any SNR), ``decode`` (received symbols -> images, or class logits for split
methods) and ``transmit`` (all three, with PSNR / SSIM / classifier accuracy). Which weights make
which model is the method's business (``Method.trained_models``); this module only reads files.
Checkpoints are read with ``weights_only=True``: a run directory from elsewhere cannot run code.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semfl.config import load_config
from semfl.protocol.checkpoint import load_checkpoint
from semfl.files import read_jsonl
from semfl.runtimes.run import CHECKPOINT, RunError

KEPT = re.compile(r"round-(\d+)$")


def kept_rounds(run_dir: Path) -> list[int]:
    """Rounds whose checkpoint the run kept (log.checkpoint_every), besides its last one."""
    folder = Path(run_dir) / "checkpoint"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := KEPT.match(p.name)) and (p / "state.pt").is_file())


def read_checkpoint(run_dir: Path, round_: int | None) -> tuple[dict, Path]:
    """The checkpoint of ``round_`` (None: the last one) and the folder of its users' state files."""
    run_dir = Path(run_dir)
    latest = run_dir / CHECKPOINT
    if round_ is not None and round_ in kept_rounds(run_dir):
        folder = run_dir / "checkpoint" / f"round-{round_}"
        return load_checkpoint(folder / "state.pt"), folder / "users"
    if not latest.is_file():
        raise RunError(f"run_dir: {run_dir} has no checkpoint ({CHECKPOINT}); has its first round finished?")
    state = load_checkpoint(latest)
    if round_ is not None and state["round"] != round_:
        have = sorted({*kept_rounds(run_dir), state["round"]})
        raise RunError(f"round: {run_dir} has no checkpoint of round {round_} (it has rounds {have}; "
                       f"log.checkpoint_every = N keeps every N-th)")
    return state, latest.parent / "users"


def user_state_reader(run_dir: Path, cfg, state: dict, users_dir: Path, node_state_dir: str | Path | None):
    """user_state(user, keys) over the checkpoint's users: files in the run directory (local
    transport) or, for a Flower deployment, the nodes' state folders where this machine can see them."""
    transport = state.get("transport") or {}
    round_ = state["round"]

    def from_nodes(user: int) -> dict:
        from semfl.config import dump_config
        from semfl.runtimes.flower.node import run_key, state_root

        root = Path(node_state_dir).expanduser() if node_state_dir else state_root({})
        folder = root / run_key(dump_config(cfg), str(Path(run_dir).resolve())) / f"user-{user}"
        rounds = sorted(int(m.group(1)) for p in folder.glob("round-*.pt") if (m := re.search(r"round-(\d+)\.pt$", p.name)))
        rounds = [r for r in rounds if r <= round_]
        if not rounds:
            raise LookupError(f"user {user}'s state lives on its Flower node, and {folder} does not hold it "
                              "(pass node_state_dir= the nodes' state-dir)")
        return torch.load(folder / f"round-{rounds[-1]}.pt", weights_only=True, map_location="cpu")

    def read(user: int, keys) -> dict[str, Any] | None:
        if "states" in transport:
            held = transport["states"].get(user) or {}
        elif "state_files" in transport:
            files = {int(k): v for k, v in transport["state_files"].items()}
            name = files.get(user)
            held = torch.load(users_dir / name, weights_only=True, map_location="cpu") if name else {}
        else:
            held = from_nodes(user)
        return {k: held[k] for k in keys if k in held}
    return read


@dataclass
class Transmission:
    """One batch sent through a codec at one SNR. ``kind`` says what came out: "images"
    (``reconstruction``, ``psnr_db``, ``ssim`` per image) or "classes" (a split method: the base
    station's ``predictions``; no images)."""

    kind: str
    snr_db: float
    channel: str
    channel_uses_per_pixel: float
    reconstruction: torch.Tensor | None = None
    predictions: torch.Tensor | None = None  # classes: the head's; images: the classifier's on the reconstruction
    psnr_db: torch.Tensor | None = None
    ssim: torch.Tensor | None = None
    accuracy: float | None = None  # with labels
    note: str = ""

    @property
    def mean_psnr_db(self) -> float | None:
        return None if self.psnr_db is None else float(self.psnr_db.clamp(max=100).mean())

    @property
    def mean_ssim(self) -> float | None:
        return None if self.ssim is None else float(self.ssim.mean())

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "snr_db": self.snr_db, "channel": self.channel,
               "channel_uses_per_pixel": self.channel_uses_per_pixel, "accuracy": self.accuracy}
        if self.kind == "images":
            out.update(psnr_db=self.mean_psnr_db, ssim=self.mean_ssim,
                       psnr_db_per_image=self.psnr_db.clamp(max=100).tolist(), ssim_per_image=self.ssim.tolist())
        if self.predictions is not None:
            out["predictions"] = self.predictions.tolist()
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class SemanticCodec:
    """A trained model of a run, ready to send images: see the module docstring."""

    model: torch.nn.Module
    name: str
    run: Any  # the RunContext the model was built in (config, image spec, test set)
    round: int
    run_dir: Path
    models: list[str] = field(default_factory=list)  # every model name the checkpoint holds
    _channels: dict = field(default_factory=dict, repr=False)
    _classifier: Any = field(default=None, repr=False)

    @property
    def cfg(self):
        return self.run.cfg

    @property
    def kind(self) -> str:
        """"images" (a semantic model) or "classes" (a split method: encoder -> channel -> head)."""
        return "images" if hasattr(self.model, "reconstruct") else "classes"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        s = self.run.spec
        return (s.channels, s.height, s.width)

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def channel_uses(self) -> int:
        """Complex channel uses per image."""
        return int(self.encode(torch.zeros(1, *self.input_shape)).shape[1])

    @property
    def channel_uses_per_pixel(self) -> float:
        """Complex channel uses per image value (C x H x W): the JSCC bandwidth ratio."""
        c, h, w = self.input_shape
        return self.channel_uses / (c * h * w)

    def check_images(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError("images: expected a float tensor (B, C, H, W) with values in [0, 1]")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"images: the model takes (B, {', '.join(map(str, self.input_shape))}) images, "
                             f"got shape {tuple(x.shape)}")
        if float(x.min()) < 0 or float(x.max()) > 1:
            raise ValueError(f"images: values must lie in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
        return x.to(self.device)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> channel input (B, n) complex, unit mean power per image."""
        return self.model.transmit_symbols(self.check_images(x))

    @torch.no_grad()
    def channel(self, symbols: torch.Tensor, snr_db: float, kind: str | None = None) -> torch.Tensor:
        """The received symbols after the channel ("awgn" or "rayleigh"; default: the run's) at snr_db."""
        from semfl.wireless.channel import Channel
        from semfl.training import snr_tensor

        kind = kind or self.cfg.channel.kind
        if kind not in self._channels:
            self._channels[kind] = Channel(kind, equalize=self.cfg.channel.equalize)
        return self._channels[kind](symbols, snr_tensor(float(snr_db), len(symbols), symbols.device))

    @torch.no_grad()
    def decode(self, received: torch.Tensor) -> torch.Tensor:
        """Received symbols -> reconstructed images (kind "images") or class logits (kind "classes")."""
        return self.model.reconstruct(received) if self.kind == "images" else self.model.classify(received)

    @property
    def classifier(self) -> torch.nn.Module:
        """The run's frozen task classifier (from its cache; trained again if the cache is gone)."""
        if self._classifier is None:
            from semfl.models.classifier import frozen_classifier, run_cache_dir

            cfg, data = self.cfg, self.run.data
            self._classifier, _, _ = frozen_classifier(
                data.spec, cfg.dataset, data.train_x, data.train_y, scale=cfg.scale, depth=cfg.classifier.depth,
                epochs=cfg.classifier.epochs, lr=cfg.classifier.lr, batch_size=cfg.classifier.batch_size,
                cache_dir=run_cache_dir(cfg), seed=cfg.seed)
            self._classifier.to(self.device)
        return self._classifier

    @torch.no_grad()
    def transmit(self, x: torch.Tensor, snr_db: float, kind: str | None = None, labels: torch.Tensor | None = None,
                 seed: int | None = None) -> Transmission:
        """encode -> channel -> decode at snr_db, with the quality of what arrived. ``seed`` makes the
        channel's draws reproducible (the same seed, the same noise)."""
        from semfl import metrics
        from semfl.protocol import seeding

        if seed is not None:
            seeding.enter(seed, "transmit", repr(float(snr_db)))
        x = self.check_images(x)
        out = self.decode(self.channel(self.encode(x), snr_db, kind))
        result = Transmission(kind=self.kind, snr_db=float(snr_db), channel=kind or self.cfg.channel.kind,
                              channel_uses_per_pixel=self.channel_uses_per_pixel)
        if self.kind == "classes":
            result.predictions = out.argmax(1).cpu()
            result.note = (f"{self.cfg.method} trains an encoder and a classifier head, not an image decoder: "
                           "transmit gives the base station's class predictions, no reconstructions")
        else:
            result.reconstruction = out.cpu()
            result.psnr_db = metrics.psnr_per_image(out, x).cpu()
            result.ssim = metrics.ssim_per_image(out, x).cpu()
            if labels is not None:
                result.predictions = self.classifier(out).argmax(1).cpu()
        if labels is not None:
            if len(labels) != len(x):
                raise ValueError(f"labels: {len(labels)} labels for {len(x)} images")
            result.accuracy = float((result.predictions == labels.cpu()).float().mean())
        return result

    def test_images(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` images (and labels) of the test subset the run evaluated on."""
        return self.run.test_x[:count], self.run.test_y[:count]

    def trained_snr_db(self) -> list[float]:
        """The SNR range the model was trained at: the link's range, or the fixed channel.snr_db."""
        c = self.cfg
        return [c.link.snr_min_db, c.link.snr_max_db] if c.channel.train_snr == "link" else [c.channel.snr_db] * 2

    def final_metrics(self) -> dict[str, Any]:
        """The last global metrics row the run wrote up to this model's round."""
        rows = [r for r in read_jsonl(self.run_dir / "metrics.jsonl")
                if r.get("scope") == "global" and r["round"] <= self.round and ("psnr_db" in r or "accuracy" in r)]
        return rows[-1] if rows else {}

    def summary(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "method": self.cfg.method, "model": self.name, "round": self.round,
                "models": self.models, "kind": self.kind, "architecture": type(self.model).__name__,
                "arch": self.cfg.model.arch, "parameters": sum(p.numel() for p in self.model.parameters()),
                "input_shape": list(self.input_shape), "channel_uses": self.channel_uses,
                "channel_uses_per_pixel": self.channel_uses_per_pixel, "channel": self.cfg.channel.kind,
                "trained_snr_db": self.trained_snr_db(), "final_metrics": self.final_metrics(),
                "training_config": self.cfg.to_dict()}


def load(run_dir: str | Path, model: str | None = None, round: int | None = None, *, device: str = "cpu",
         node_state_dir: str | Path | None = None) -> SemanticCodec:
    """A run's trained model as a :class:`SemanticCodec`.

    model: "global" (the default where the method has one), "user:K", "mentor:K", "pair:I-J"...
    (``codec.models`` lists them); round: a round with a checkpoint (None: the last);
    node_state_dir: where a Flower deployment's nodes kept the users' state (for user models)."""
    from semfl.methods import get_method
    from semfl.protocol.method import RunContext
    from semfl.runtimes.run import prepare_data

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise RunError(f"run_dir: {run_dir} is not a run directory (it has no config.toml)")
    cfg = load_config(run_dir / "config.toml")
    cfg = dataclasses.replace(cfg, device=device)
    state, users_dir = read_checkpoint(run_dir, round)
    dataset, parts, test_idx = prepare_data(cfg)
    run = RunContext(cfg=cfg, data=dataset, spec=dataset.spec, parts=parts, classifier=None, link=None,
                     device=torch.device(device), test_x=dataset.test_x[test_idx].to(device),
                     test_y=dataset.test_y[test_idx].to(device), log=lambda message: None)
    reader = user_state_reader(run_dir, cfg, state, users_dir, node_state_dir)
    builders = get_method(cfg.method).trained_models(run, state["method"], reader)
    if not builders:
        raise RunError(f"model: method {cfg.method!r} does not name its trained models (Method.trained_models)")
    name = model or ("global" if "global" in builders else next(iter(builders)))
    if name not in builders:
        raise RunError(f"model: {name!r} is not a model of this {cfg.method} run (its models: {', '.join(builders)})")
    try:
        module = builders[name]()
    except LookupError as exc:
        raise RunError(f"model {name}: {exc}") from None
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return SemanticCodec(module, name, run, int(state["round"]), run_dir, list(builders))
