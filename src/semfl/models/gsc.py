"""GSC mentors (PSFL Section II-A, eqs. 1-7): MAE encoder/decoder around the shared channel codec.

image -> PatchEmbed + fixed sin-cos positions -> [cls] + ViT encoder blocks -> norm
-> decoder_embed (D -> Dd) -> drop cls => **S** (B, tokens, Dd), Dd = Shared.semantic_dim
-> ChannelCodec.encode -> **X** (complex, unit mean power per image) -> channel(X, snr) -> Y
-> ChannelCodec.decode -> **C** (B, tokens, Dd) -> + decoder_pos_embed -> decoder blocks
-> decoder_norm -> decoder_pred -> unpatchify -> sigmoid -> reconstruction.

The decoder width *is* the shared semantic_dim, so S and C have the layout PSFL's eq. 23 needs
(the same as the CSC student's at the same scale).

Choices (ours, documented):
* **cls token and the decoder.** MAE's decoder also sees the encoder's cls token. Only the
  patch tokens are sent over the channel (S has exactly ``tokens`` rows), and passing the
  cls token to the receiver outside the channel would not be physical, so the decoder runs
  on the patch tokens only (no decoder cls). The encoder still uses its cls token, so an
  official MAE encoder loads and behaves as trained. ``mae_loss`` drops the cls from the
  decoder too by default (pretraining matches deployment); ``decoder_cls=True`` gives
  MAE's original decoder input.
* **Output range.** The reconstruction is ``sigmoid(decoder_pred)`` in [0, 1]. MAE pretraining
  with ``norm_pix_loss=False`` therefore compares ``sigmoid(pred)`` with the pixel targets;
  with ``norm_pix_loss=True`` it compares the raw prediction with per-patch normalised
  targets, exactly as MAE (such a decoder head is not in pixel space; fine-tune it).
* **Positions** are fixed sin-cos tables kept as non-persistent buffers (``pos_embed``
  (1, 1+L, D) and ``decoder_pos_embed`` (1, 1+L, Dd), cls row zero): they are not in the
  state dict, never trained, aggregated or pruned, and recomputed for any grid, so a
  checkpoint's tables are ignored when loading.
* Initialisation follows MAE (xavier-uniform linears and patch conv, cls/mask tokens
  N(0, 0.02)); the channel codec keeps its own (shared with the CSC student) init.

Presets (embed_dim, depth, heads, decoder depth, decoder heads); decoder width = semantic_dim:
  paper: gsc-m = MAE-Base (768, 12, 12, 8, 16), gsc-l = MAE-Large (1024, 24, 16, 8, 16),
         gsc-h = MAE-Huge (1280, 32, 16, 8, 16)  (with semantic_dim 512: ~112 M / 330 M / 658 M)
  cpu:   (96, 2, 4, 1, 4) / (128, 3, 4, 2, 4) / (160, 4, 4, 2, 4)
  tiny:  (32, 1, 2, 1, 2) / (48, 1, 2, 1, 2) / (64, 2, 2, 1, 2)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from semfl.models.base import ImageSpec, SemanticModel, SemanticOutput
from semfl.models.channel_codec import ChannelCodec
from semfl.models.registry import Shared, register_arch
from semfl.models.vit import Block, PatchEmbed, patchify, random_masking, sincos_pos_embed_tensor, unpatchify

# (embed_dim, depth, heads, dec_depth, dec_heads) per scale and mentor size
GSC_PRESETS: dict[str, dict[str, tuple[int, int, int, int, int]]] = {
    "paper": {"gsc-m": (768, 12, 12, 8, 16), "gsc-l": (1024, 24, 16, 8, 16), "gsc-h": (1280, 32, 16, 8, 16)},
    "cpu": {"gsc-m": (96, 2, 4, 1, 4), "gsc-l": (128, 3, 4, 2, 4), "gsc-h": (160, 4, 4, 2, 4)},
    "tiny": {"gsc-m": (32, 1, 2, 1, 2), "gsc-l": (48, 1, 2, 1, 2), "gsc-h": (64, 2, 2, 1, 2)},
}

# the keys an official MAE checkpoint may carry that are recomputed here
_FIXED_KEYS = ("pos_embed", "decoder_pos_embed")
# model parts that are not part of the MAE layout (never "missing" from an MAE checkpoint)
_NON_MAE_PREFIXES = ("codec.", "channel.")


class GSC(SemanticModel):
    """A GAI-assisted semantic communication model: MAE encoder/decoder + DNN channel codec."""

    def __init__(self, spec: ImageSpec, channel: nn.Module, shared: Shared, embed_dim: int, depth: int,
                 heads: int, dec_depth: int, dec_heads: int, mlp_ratio: float = 4.0):
        super().__init__(channel)
        dec_dim = shared.semantic_dim
        for name, dim, h in (("encoder", embed_dim, heads), ("decoder", dec_dim, dec_heads)):
            if dim % h:
                raise ValueError(f"GSC {name}: {h} heads do not divide the width {dim}")
            if dim % 4:
                raise ValueError(f"GSC {name}: width {dim} must be divisible by 4 (2-D sin-cos positions)")
        self.spec = spec
        self.patch = shared.patch
        self.in_chans = spec.channels
        self.embed_dim = embed_dim
        self.semantic_dim = dec_dim

        # ---- MAE encoder (semantic encoder S(.; theta))
        self.patch_embed = PatchEmbed((spec.height, spec.width), shared.patch, spec.channels, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        self.tokens = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_tensor(embed_dim, self.grid_size, cls_token=True),
                             persistent=False)
        self.blocks = nn.ModuleList([Block(embed_dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        # ---- MAE decoder (semantic decoder S^-1(.; delta)); its input width is semantic_dim
        self.decoder_embed = nn.Linear(embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_tensor(dec_dim, self.grid_size, cls_token=True),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList([Block(dec_dim, dec_heads, mlp_ratio) for _ in range(dec_depth)])
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, shared.patch * shared.patch * spec.channels)

        self._init_mae_weights()

        # ---- channel codec C(.; alpha) / C^-1(.; beta), shared design with the CSC student
        self.codec = ChannelCodec(dec_dim, shared.symbols_per_token, shared.codec_hidden)
        self.n_symbols = self.tokens * shared.symbols_per_token

    def _init_mae_weights(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for part in (self.blocks, self.norm, self.decoder_embed, self.decoder_blocks, self.decoder_norm,
                     self.decoder_pred):
            part.apply(_init_linear_and_norm)

    # ------------------------------------------------------------------ encoder / decoder

    def forward_encoder(self, images: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """images -> encoder latent (B, 1 + kept, D) incl. cls; with mask_ratio > 0 (pretraining
        only) also the mask (B, L) and ids_restore (B, L), else (latent, None, None)."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:, :]
        mask = ids_restore = None
        if mask_ratio > 0.0 or noise is not None:
            x, mask, ids_restore = random_masking(x, mask_ratio, noise=noise, generator=generator)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def semantic_features(self, images: torch.Tensor) -> torch.Tensor:
        """S = decoder_embed(encoder(images)) without the cls row: (B, tokens, semantic_dim)."""
        latent, _, _ = self.forward_encoder(images)
        return self.decoder_embed(latent[:, 1:, :])

    def forward_decoder(self, tokens: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, Dd) decoder tokens in patch order -> raw patch predictions (B, L, p*p*C).
        ``cls`` (B, 1, Dd), if given, is prepended (MAE's original decoder input) and dropped."""
        x = tokens + self.decoder_pos_embed[:, 1:, :]
        if cls is not None:
            x = torch.cat([cls + self.decoder_pos_embed[:, :1, :], x], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :] if cls is not None else x

    def semantic_decode(self, C: torch.Tensor) -> torch.Tensor:
        """Channel-decoder output C (B, tokens, Dd) -> reconstruction in [0, 1]."""
        pred = self.forward_decoder(C)
        return torch.sigmoid(unpatchify(pred, self.patch, self.in_chans, self.grid_size))

    def transmit_symbols(self, images: torch.Tensor) -> torch.Tensor:
        """The sender's half: images -> X, (B, n) complex channel input of unit mean power."""
        return self.codec.encode(self.semantic_features(images))

    def reconstruct(self, Y: torch.Tensor) -> torch.Tensor:
        """The receiver's half: (B, n) received complex symbols -> reconstructed images."""
        return self.semantic_decode(self.codec.decode(Y, self.tokens))

    def forward(self, images: torch.Tensor, snr_db: torch.Tensor | float) -> SemanticOutput:
        S = self.semantic_features(images)
        X = self.codec.encode(S)
        Y = self.channel(X, snr_db)
        C = self.codec.decode(Y, self.tokens)
        return SemanticOutput(S=S, X=X, C=C, recon=self.semantic_decode(C))


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _make_factory(arch: str):
    def factory(scale: str, spec: ImageSpec, channel: nn.Module, shared: Shared) -> GSC:
        if scale not in GSC_PRESETS:
            raise ValueError(f"scale: unknown scale {scale!r} for {arch} (allowed: {', '.join(GSC_PRESETS)})")
        embed_dim, depth, heads, dec_depth, dec_heads = GSC_PRESETS[scale][arch]
        return GSC(spec, channel, shared, embed_dim, depth, heads, dec_depth, dec_heads)
    factory.__name__ = f"build_{arch.replace('-', '_')}"
    return factory


for _arch in ("gsc-m", "gsc-l", "gsc-h"):
    register_arch(_arch)(_make_factory(_arch))


# ---------------------------------------------------------------------- MAE pretraining

def mae_loss(model: GSC, images: torch.Tensor, mask_ratio: float = 0.75, norm_pix_loss: bool = False,
             noise: torch.Tensor | None = None, target: torch.Tensor | None = None,
             generator: torch.Generator | None = None, decoder_cls: bool = False) -> torch.Tensor:
    """MAE's masked-patch reconstruction loss (no channel codec, no channel).

    Encoder on the kept tokens -> decoder_embed -> mask tokens appended -> unshuffle ->
    decoder -> per-patch prediction; mean squared error per patch, averaged over the
    *removed* patches only. ``noise`` (B, L) fixes the mask; ``target`` (default: the
    images) is what the prediction is compared with. Without ``norm_pix_loss`` the
    prediction goes through the same sigmoid as the GSC reconstruction.
    """
    latent, mask, ids_restore = model.forward_encoder(images, mask_ratio, noise=noise, generator=generator)
    x = model.decoder_embed(latent)
    B, L = mask.shape
    kept = x[:, 1:, :]
    mask_tokens = model.mask_token.expand(B, L - kept.shape[1], -1)
    x_ = torch.cat([kept, mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x_.shape[2]))  # unshuffle
    pred = model.forward_decoder(x_, cls=x[:, :1, :] if decoder_cls else None)

    tgt = patchify(images if target is None else target, model.patch)
    if norm_pix_loss:
        mean = tgt.mean(dim=-1, keepdim=True)
        var = tgt.var(dim=-1, keepdim=True)
        tgt = (tgt - mean) / (var + 1.0e-6) ** 0.5
    else:
        pred = torch.sigmoid(pred)
    per_patch = ((pred - tgt) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def pretrain_mae(model: GSC, images: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int,
                 progress: Callable[[int, float], None] | None = None, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = False, weight_decay: float = 0.05) -> list[float]:
    """Self-supervised MAE pretraining of the encoder/decoder on ``images`` (N, C, H, W) in [0, 1].

    AdamW (betas 0.9/0.95, weight decay on matrices only, as MAE), a seeded shuffle and seeded
    masks; returns the mean loss per epoch and calls ``progress(epoch, mean_loss)`` after each.
    """
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"pretrain_mae: need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    device = next(model.parameters()).device
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith(_NON_MAE_PREFIXES):
            continue
        (no_decay if p.ndim <= 1 or name in ("cls_token", "mask_token") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    history: list[float] = []
    n = images.shape[0]
    from semfl.progress import bar

    steps = bar("MAE pretraining", epochs * n, unit="images", estimate=True)
    try:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            total, count = 0.0, 0
            for start in range(0, n, batch_size):
                batch = images[perm[start:start + batch_size]].to(device)
                noise = torch.rand(batch.shape[0], model.tokens, generator=gen)
                loss = mae_loss(model, batch, mask_ratio, norm_pix_loss, noise=noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * batch.shape[0]
                count += batch.shape[0]
                steps.advance(batch.shape[0])
            mean = total / max(count, 1)
            history.append(mean)
            if progress is not None:
                progress(epoch, mean)
    finally:
        model.train(was_training)
        steps.close()
    return history


# ---------------------------------------------------------------------- official checkpoints

def load_mae_checkpoint(model: GSC, path: str | Path, strict_shapes: bool = True) -> dict[str, list[str]]:
    """Load an official-layout MAE checkpoint (``torch.save``d ``{'model': state_dict}`` or a
    bare state dict) into ``model``.

    Every checkpoint key that names a model tensor is copied (a ``module.`` prefix is
    stripped); ``pos_embed`` / ``decoder_pos_embed`` are ignored (fixed sin-cos, recomputed).
    Returns ``{'loaded', 'missing', 'unexpected', 'ignored', 'mismatched'}``: ``missing`` are
    MAE-layout model keys (the codec and channel excluded) the checkpoint lacks. A shape
    mismatch raises ValueError naming the key and both shapes; with ``strict_shapes=False``
    it is skipped and listed in ``mismatched`` (e.g. a patch-16 ``patch_embed`` for patch 4).
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not an MAE checkpoint (expected a state dict or {{'model': state_dict}})")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}

    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "missing": [], "unexpected": [], "ignored": [], "mismatched": []}
    to_copy: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _FIXED_KEYS:
            report["ignored"].append(key)
        elif key not in own:
            report["unexpected"].append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            msg = f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(own[key].shape)}"
            if strict_shapes:
                raise ValueError(f"{path}: {msg}")
            report["mismatched"].append(msg)
        else:
            to_copy[key] = value
    with torch.no_grad():
        for key, value in to_copy.items():
            own[key].copy_(value.to(dtype=own[key].dtype))
            report["loaded"].append(key)
    report["missing"] = [k for k in own if k not in state and not k.startswith(_NON_MAE_PREFIXES)]
    return report


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["GSC", "GSC_PRESETS", "mae_loss", "pretrain_mae", "load_mae_checkpoint", "count_parameters"]
