"""The separation baseline on a set of images: source codec + digital link, and the ideal bound.

Three curves over an SNR sweep at a bandwidth ratio (complex channel uses per source value,
k/n with n = C*H*W, the learned models' own ratio):

* ``adapted``: the link-adaptation table's MCS for each evaluated SNR (the envelope link
  adaptation reaches);
* ``designed``: the MCS chosen once for ``design_snr`` and used at every SNR: above it the
  quality stays flat, below its threshold the blocks fail: the cliff;
* ``capacity``: the same codec given ``floor(k log2(1 + SNR))`` error-free bits (on Rayleigh
  ``|h|^2 SNR`` per image: a transmitter that knows the fade), the best any separate scheme does.

Each image gets the largest codec quality whose transmitted bitstream fits the image's payload
(never more bits than the budget). An image whose blocks fail their CRC, that does not fit even at
the lowest quality, or whose bitstream does not decode, is replaced by ``fallback`` (default: the
mean of the images given, the dataset's mean image a receiver can hold in advance), so it is
counted in PSNR, SSIM and classifier accuracy rather than dropped.
"""
from __future__ import annotations

import math
import time
import zlib
from contextlib import contextmanager

import numpy as np
import torch

from semfl import metrics
from semfl.wireless.channel import Channel, seed_channels
from semfl.wireless import digital, image_codec
from semfl.wireless.link_table import MCS, capacity_bits, choose_mcs


class EncodedSet:
    """The images and their codec payloads, encoded once per quality and reused across SNRs and
    curves, with each image's decoded version per quality and its SSIM and classifier verdict
    (per-image values, so the same whatever batch they are computed in)."""

    def __init__(self, images: torch.Tensor, codec: str = "jpeg"):
        self.images = images
        self.codec = image_codec.ImageCodec(codec)
        self.u8 = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        self._payloads: dict[int, list[bytes]] = {}
        self._files: dict[int, np.ndarray] = {}
        self._sizes: dict[int, np.ndarray] = {}  # payload bytes per image
        self._decoded: dict[tuple[int, int], np.ndarray | None] = {}  # (quality index, image) -> image
        self._scores: dict[object, dict[str, torch.Tensor]] = {}  # source -> per-image ssim / correct

    def payloads(self, qi: int) -> list[bytes]:
        if qi not in self._payloads:
            out = [self.codec.encode(img, image_codec.QUALITIES[qi]) for img in self.u8]
            self._payloads[qi] = [p for p, _ in out]
            self._files[qi] = np.array([f for _, f in out])
            self._sizes[qi] = np.array([len(p) for p in self._payloads[qi]])
        return self._payloads[qi]

    def choose(self, capacity: np.ndarray) -> np.ndarray:
        """Per image, the largest quality index whose bitstream fits ``capacity`` bits (-1: none)."""
        capacity = np.asarray(capacity)
        values, inverse = np.unique(capacity, return_inverse=True)
        fields = np.array([image_codec.QUALITY_BITS + image_codec.length_bits(int(c)) for c in values])[inverse]
        best = np.full(len(self.u8), -1)
        for qi in range(len(image_codec.QUALITIES)):
            self.payloads(qi)
            fits = fields.reshape(capacity.shape) + 8 * self._sizes[qi] <= capacity
            best[fits] = qi
            if not fits.any():
                break
        return best

    def decoded(self, qi: int, payload: bytes) -> np.ndarray:
        return self.codec.decode(payload, image_codec.QUALITIES[qi], self.u8.shape[1:])

    def own(self, qi: int, i: int) -> np.ndarray | None:
        """Image ``i`` decoded from its own payload at quality ``qi`` (None if it does not decode)."""
        key = (qi, i)
        if key not in self._decoded:
            try:
                self._decoded[key] = self.decoded(qi, self.payloads(qi)[i])
            except Exception:
                self._decoded[key] = None
        return self._decoded[key]

    def scores(self, source, recon: torch.Tensor, idx: np.ndarray, labels, classifier, batch_size: int,
               one_image: bool = False) -> dict:
        """Per-image SSIM (and classifier verdicts) of ``recon[idx]``, all of one ``source``
        (a quality index or the fallback's key), computed once per image. With ``one_image`` (the
        fallback: every row is the same image) the classifier's label is computed once."""
        n = len(self.u8)
        store = self._scores.setdefault(source, {"ssim": torch.full((n,), float("nan")),
                                                 "correct": torch.zeros(n, dtype=torch.bool),
                                                 "done": torch.zeros(n, dtype=torch.bool)})
        todo = torch.from_numpy(idx)[~store["done"][idx]]
        label = _predicted(classifier, recon[todo[:1]]) if one_image and classifier is not None and len(todo) else None
        for b in range(0, len(todo), batch_size):
            rows = todo[b:b + batch_size]
            x, y = recon[rows], self.images[rows]
            store["ssim"][rows] = metrics.ssim_per_image(x, y).cpu()
            if label is not None:
                store["correct"][rows] = labels[rows].cpu() == label
            elif classifier is not None:
                store["correct"][rows] = _correct(classifier, x, labels[rows])
            store["done"][rows] = True
        return store


def _correct(classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image: the classifier's label is right (as metrics.accuracy counts it)."""
    return _predicted(classifier, images) == labels.cpu()


def _predicted(classifier, images: torch.Tensor) -> torch.Tensor:
    """The classifier's label of each image (on the CPU)."""
    param = next(iter(classifier.parameters()), None)
    device = param.device if param is not None else images.device
    was_training = classifier.training
    classifier.eval()
    try:
        with torch.no_grad():
            return classifier(images.to(device)).argmax(dim=-1).cpu()
    finally:
        classifier.train(was_training)


def _to_tensor(arrays: list[np.ndarray], like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(like.device, like.dtype) / 255


@contextmanager
def _timed(timings: dict[str, float] | None, stage: str):
    """Add the block's wall time to ``timings[stage]`` (nothing when ``timings`` is None)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


FALLBACK, OTHER = -1, -2  # sources of a reconstruction besides a quality index


def _reconstruct(enc: EncodedSet, chosen, streams, ok, fallback):
    """Decode the received (quality, payload) of each ok image; the others get the fallback.

    Returns (reconstructions, fraction lost, source per image: the quality index when the image is
    its own payload decoded, FALLBACK, or OTHER for a corrupt stream that passed the CRC and decoded)."""
    recon, lost, source = [], 0, np.full(len(chosen), FALLBACK)
    fb = (fallback * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    for i in range(len(chosen)):
        img = None
        if ok[i] and chosen[i] >= 0:
            qi, payload = streams[i]
            if payload == enc.payloads(qi)[i]:
                img, source[i] = enc.own(qi, i), qi
            else:
                try:
                    img, source[i] = enc.decoded(qi, payload), OTHER
                except Exception:  # a corrupt stream that passed the CRC: lost like a failed block
                    img = None
            if img is None:
                source[i] = FALLBACK
        lost += img is None
        recon.append(fb if img is None else img)
    return _to_tensor(recon, enc.images), lost / len(chosen), source


def send_digital(enc: EncodedSet, channel_uses: int, mcs: MCS | None, channel: Channel, snr_db: float,
                 fallback: torch.Tensor, batch_size: int = 500, with_source: bool = False,
                 timings: dict[str, float] | None = None):
    """Reconstructions of ``enc``'s images sent with ``mcs`` at ``snr_db``, and the link's figures
    (and each image's source, see :func:`_reconstruct`, with ``with_source``). With ``timings``,
    the seconds spent in the digital link are added to its ``"link"`` entry."""
    plan = digital.layout(channel_uses, mcs) if mcs is not None else None
    n = len(enc.u8)
    if plan is None:
        out = fallback.expand_as(enc.images).clone(), {"mcs": None, "payload_bits": 0, "lost": 1.0,
                                                       "bits_per_image": 0.0, "bits_with_headers": 0.0}
        return (*out, None) if with_source else out
    cap = plan.payload_bits
    chosen = enc.choose(np.full(n, cap))
    bits = np.stack([image_codec.to_bits(enc.payloads(q)[i], q, cap) if q >= 0 else np.zeros(cap, np.uint8)
                     for i, q in enumerate(chosen)])
    need = torch.from_numpy(chosen >= 0)  # an image that is not sent is lost whatever its blocks do
    received, ok = [], []
    for start in range(0, n, batch_size):
        sent = torch.from_numpy(bits[start:start + batch_size]).to(enc.images.device, torch.float32)
        with _timed(timings, "link"):
            r, o = digital.transmit(sent, plan, channel, snr_db, need=need[start:start + batch_size])
        received.append(r.round().to(torch.uint8).cpu().numpy())
        ok.append(o.cpu().numpy())
    received, ok = np.concatenate(received), np.concatenate(ok)
    streams = []
    for row, fine in zip(received, ok):
        try:
            streams.append(image_codec.from_bits(row, cap) if fine else None)
        except ValueError:
            streams.append(None)
    ok = ok & np.array([s is not None for s in streams])
    recon, lost, source = _reconstruct(enc, chosen, streams, ok, fallback)
    info = {"mcs": mcs.name, "payload_bits": cap, "lost": lost, **_bit_figures(enc, chosen, cap)}
    return (recon, info, source) if with_source else (recon, info)


def _bit_figures(enc: EncodedSet, chosen: np.ndarray, cap) -> dict:
    caps = np.broadcast_to(np.asarray(cap), chosen.shape)
    sent = [(image_codec.stream_bits(enc.payloads(q)[i], int(caps[i])), 8 * int(enc._files[q][i]))
            for i, q in enumerate(chosen) if q >= 0]
    stripped, full = (np.mean([s[k] for s in sent]) if sent else 0.0 for k in (0, 1))
    return {"bits_per_image": float(stripped), "bits_with_headers": float(full)}


def send_at_capacity(enc: EncodedSet, channel_uses: int, channel: Channel, snr_db: float,
                     fallback: torch.Tensor, with_source: bool = False):
    """The ideal bound: error-free bits up to the channel's capacity, per image on Rayleigh."""
    n = len(enc.u8)
    if channel.kind == "rayleigh":
        h = channel.sample(n, 1, snr_db).h.reshape(-1)
        gain_db = 10 * torch.log10(h.real.square() + h.imag.square()).numpy()
        cap = np.array([capacity_bits(channel_uses, snr_db + g) for g in gain_db])
    else:
        cap = np.full(n, capacity_bits(channel_uses, snr_db))
    chosen = enc.choose(cap)
    streams = [(q, enc.payloads(q)[i]) if q >= 0 else None for i, q in enumerate(chosen)]
    recon, lost, source = _reconstruct(enc, chosen, streams, chosen >= 0, fallback)
    info = {"payload_bits": float(cap.mean()), "lost": lost, **_bit_figures(enc, chosen, cap)}
    return (recon, info, source) if with_source else (recon, info)


def quality(recon: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, classifier, batch_size: int = 500,
            enc: EncodedSet | None = None, source: np.ndarray | None = None) -> dict:
    """PSNR (per image, capped at 100 dB as the learned models' sweep does), SSIM, accuracy, MSE.

    With ``enc`` and each image's ``source`` (from :func:`send_digital` / :func:`send_at_capacity`),
    an image's SSIM and classifier verdict are taken from ``enc`` when that reconstruction was scored
    before (the same values: they are per image)."""
    psnr = torch.cat([metrics.psnr_per_image(recon[i:i + batch_size], images[i:i + batch_size]).clamp(max=100)
                      for i in range(0, len(images), batch_size)])
    out = {"psnr_db": float(psnr.mean())}
    if source is None or enc is None:
        ssim = torch.cat([metrics.ssim_per_image(recon[i:i + batch_size], images[i:i + batch_size])
                          for i in range(0, len(images), batch_size)])
        accuracy = None if classifier is None else metrics.accuracy(classifier, recon, labels, batch_size)
    else:
        ssim, correct = torch.empty(len(images)), torch.zeros(len(images), dtype=torch.bool)
        for s in np.unique(source):
            idx = np.flatnonzero(source == s)
            if s == OTHER:  # a stream corrupted past the CRC: scored here, not kept
                rows = torch.from_numpy(idx)
                ssim[rows] = metrics.ssim_per_image(recon[rows], images[rows]).cpu()
                if classifier is not None:
                    correct[rows] = _correct(classifier, recon[rows], labels[rows])
                continue
            key = ("fallback", recon[idx[0]].cpu().numpy().tobytes()) if s == FALLBACK else int(s)
            store = enc.scores((key, id(classifier)), recon, idx, labels, classifier, batch_size,
                               one_image=s == FALLBACK)
            ssim[idx], correct[idx] = store["ssim"][idx], store["correct"][idx]
        accuracy = None if classifier is None else int(correct.sum()) / len(images)
    out.update(ssim=float(ssim.mean()), mse=float(torch.nn.functional.mse_loss(recon, images)))
    if accuracy is not None:
        out["accuracy"] = accuracy
    return out


MODES = ("adapted", "designed", "capacity")
STAGES = ("link", "codec", "scoring")  # where a sweep's time goes (``sweep(timings=...)``)


def design_snr_default(snrs: list[float]) -> float:
    """The middle of the sweep's SNR range."""
    return (min(snrs) + max(snrs)) / 2


def curve_labels(codec: str, design_snr: float) -> dict[str, str]:
    name = {"jpeg": "JPEG", "webp": "WebP"}[codec]
    return dict(zip(MODES, (f"{name} + LDPC + QAM, adapted", f"{name} + LDPC + QAM, designed for {design_snr:g} dB",
                            f"{name} at capacity")))


def sweep(images: torch.Tensor, labels: torch.Tensor, classifier, ratio: float, snrs: list[float],
          kind: str = "awgn", equalize: bool = True, design_snr: float | None = None, codec: str = "jpeg",
          fallback: torch.Tensor | None = None, seed: int = 0, batch_size: int = 500,
          encoded: EncodedSet | None = None, modes: tuple[str, ...] = MODES,
          timings: dict[str, float] | None = None) -> dict[str, dict[str, list]]:
    """The three curves (see the module docstring) over ``snrs``: {label: {metric: [per SNR]}}.

    ``ratio`` is k/n, complex channel uses per source value; each SNR point and curve is seeded
    from ``seed`` so the sweep is repeatable, and a curve's values do not depend on which other
    ``modes`` (of :data:`MODES`) are swept with it. With ``timings`` (a dict), the seconds spent
    are added to its entries :data:`STAGES`: the digital link (CRC, LDPC, QAM, channel, demapping,
    decoding), the source codec (choosing the quality, encoding, the bitstream, decoding) and the
    scoring (PSNR, SSIM, classifier); their sum is the sweep's time but for a few milliseconds.
    """
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise ValueError(f"modes: {sorted(unknown) or 'none given'}; known: {', '.join(MODES)}")
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    channel_uses = int(math.floor(ratio * images[0].numel()))
    design = design_snr_default(snrs) if design_snr is None else float(design_snr)
    fallback = images.mean(0) if fallback is None else fallback
    enc = encoded or EncodedSet(images, codec)
    channel = Channel(kind, equalize=equalize)
    names = {mode: label for mode, label in curve_labels(codec, design).items() if mode in modes}
    out = {label: {} for label in names.values()}
    stages = dict.fromkeys(STAGES, 0.0)  # "codec" gathers the sending's time, the link's taken out below
    for snr in snrs:
        for mode, label in names.items():
            seed_channels(zlib.crc32(f"{seed}/digital/{mode}/{snr!r}".encode()))
            with _timed(stages, "codec"):
                if mode == "capacity":
                    recon, info, source = send_at_capacity(enc, channel_uses, channel, snr, fallback, with_source=True)
                else:
                    mcs = choose_mcs(snr if mode == "adapted" else design)
                    recon, info, source = send_digital(enc, channel_uses, mcs, channel, snr, fallback, batch_size,
                                                       with_source=True, timings=stages)
            with _timed(stages, "scoring"):
                scored = quality(recon, images, labels, classifier, batch_size, enc, source)
            row = {**scored, **info, "channel_uses": channel_uses}
            for key, value in row.items():
                out[label].setdefault(key, []).append(value)
    stages["codec"] -= stages["link"]
    if timings is not None:
        for stage, seconds in stages.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    return out


__all__ = ["MODES", "STAGES", "EncodedSet", "curve_labels", "design_snr_default", "quality", "send_at_capacity", "send_digital",
           "sweep"]
