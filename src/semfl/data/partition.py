"""Splitting a labelled training set among federated users.

Every scheme is a pure function of (labels, arguments, seed): the same seed gives the same
partition on any machine, and the parts are disjoint sets of valid indices.
"""
from __future__ import annotations

import numpy as np

from semfl.data.sources import DataError

SCHEMES = ("iid", "dirichlet", "ways_shots")
MAX_DIRICHLET_TRIES = 100


def partition(
    labels: np.ndarray,
    num_users: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.9,
    ways: int = 3,
    shots: int = 100,
    sigma: int = 1,
    sizes: list[int] | None = None,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Index arrays (sorted int64), one per user.

    - ``iid``: shuffled and split evenly (or into ``sizes``).
    - ``dirichlet``: per class, shares over users ~ Dir(alpha); with ``sizes``, per user class
      shares ~ Dir(alpha) over classes and exactly ``sizes[i]`` samples.
    - ``ways_shots``: m-way q-shot (FedProto): n_i in [max(2, m-σ), m+σ] classes, q±σ samples each
      (or ``sizes[i]`` samples spread over the n_i classes).
    """
    labels = _check_labels(labels)
    n = labels.shape[0]
    num_classes = _check_num_classes(labels, num_classes)
    if not isinstance(num_users, (int, np.integer)) or num_users < 1:
        raise DataError(f"num_users must be a positive integer, got {num_users!r}")
    if sizes is not None and len(sizes) == 0:
        sizes = None  # the config's "empty list" means natural sizes
    if sizes is not None:
        sizes = _check_sizes(sizes, num_users, n)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(n, num_users, sizes, rng)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise DataError(f"dirichlet alpha must be > 0, got {alpha!r}")
        if sizes is None:
            parts = _dirichlet(labels, num_users, num_classes, alpha, rng)
        else:
            parts = _dirichlet_sizes(labels, sizes, num_classes, alpha, rng)
    elif scheme == "ways_shots":
        parts = _ways_shots(labels, num_users, num_classes, ways, shots, sigma, sizes, rng)
    else:
        raise DataError(f"unknown partition scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def fit_sizes(sizes: list[int], n: int) -> list[int]:
    """Per-user sizes as relative volumes that fit ``n`` samples: unchanged when they sum to at most
    ``n`` (Table I on a full dataset), else each scaled by n / sum and rounded down (at least 1), so a
    smaller dataset (8,000 MNIST images, say) keeps Table I's proportions. An error names the
    fields to change when not even one sample per user fits."""
    total = sum(sizes)
    if total <= n:
        return list(sizes)
    if len(sizes) > n:
        raise DataError(f"data.sizes: {len(sizes)} users but only {n} training samples; lower users "
                        "(and data.sizes with it) or use a larger dataset")
    return [max(1, s * n // total) for s in sizes]


def class_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(users, classes) sample counts."""
    labels = _check_labels(labels)
    _check_num_classes(labels, num_classes)
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, part in enumerate(parts):
        hist[i] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return hist


# ---------------------------------------------------------------- validation


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise DataError(f"labels must be >= 0, found {int(labels.min())}")
    return labels.astype(np.int64, copy=False)


def _check_num_classes(labels: np.ndarray, num_classes: int | None) -> int:
    top = int(labels.max()) + 1 if labels.size else 0
    if num_classes is None:
        return max(top, 1)
    if top > num_classes:
        raise DataError(f"num_classes={num_classes} but labels go up to {top - 1}")
    return int(num_classes)


def _check_sizes(sizes: list[int], num_users: int, n: int) -> list[int]:
    if len(sizes) != num_users:
        raise DataError(f"sizes has {len(sizes)} entries but num_users={num_users}")
    out = [int(s) for s in sizes]
    if any(s < 0 or s != orig for s, orig in zip(out, sizes)):
        raise DataError(f"sizes must be non-negative integers, got {list(sizes)}")
    if sum(out) > n:
        raise DataError(f"sizes sum to {sum(out)} but there are only {n} samples")
    return out


# ---------------------------------------------------------------- schemes


def _iid(n: int, num_users: int, sizes: list[int] | None, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n)
    if sizes is None:
        if n < num_users:
            raise DataError(f"iid: {n} samples cannot give each of {num_users} users one")
        return np.array_split(perm, num_users)
    return np.split(perm[: sum(sizes)], np.cumsum(sizes)[:-1])


def _dirichlet(labels: np.ndarray, num_users: int, num_classes: int, alpha: float,
               rng: np.random.Generator) -> list[np.ndarray]:
    n = labels.shape[0]
    if n < num_users:
        raise DataError(f"dirichlet: {n} samples cannot give each of {num_users} users one")
    by_class = [np.flatnonzero(labels == k) for k in range(num_classes)]
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_users)]
        counts = np.zeros(num_users, dtype=np.int64)
        for idx in by_class:
            if idx.size == 0:
                continue
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_users, alpha))
            # MOON / NIID-Bench balancing: users already above the mean size get no more,
            # which keeps sizes from exploding while the label skew follows alpha
            masked = p * (counts < n / num_users)
            if masked.sum() > 0:
                p = masked
            cuts = (np.cumsum(p / p.sum()) * idx.size).astype(np.int64)[:-1]
            for user, chunk in enumerate(np.split(idx, cuts)):
                parts[user].append(chunk)
                counts[user] += chunk.size
        if counts.min() >= 1:
            return [np.concatenate(p) for p in parts]
    raise DataError(f"dirichlet alpha={alpha}: some of the {num_users} users got no samples in "
                    f"{MAX_DIRICHLET_TRIES} draws; use a larger alpha or fewer users")


def _dirichlet_sizes(labels: np.ndarray, sizes: list[int], num_classes: int, alpha: float,
                     rng: np.random.Generator) -> list[np.ndarray]:
    pools = [rng.permutation(np.flatnonzero(labels == k)) for k in range(num_classes)]
    taken = np.zeros(num_classes, dtype=np.int64)
    avail = np.array([p.size for p in pools], dtype=np.int64)
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(sizes)
    # random user order so no user is systematically the one squeezed by exhausted classes
    for user in rng.permutation(len(sizes)):
        q = rng.dirichlet(np.full(num_classes, alpha))
        want = np.zeros(num_classes, dtype=np.int64)
        need = sizes[user]
        while need > 0:
            room = avail - taken - want
            w = q * (room > 0)
            if w.sum() <= 0:  # the user's favourite classes are used up: spread over the rest
                w = (room > 0).astype(np.float64)
            draw = np.minimum(rng.multinomial(need, w / w.sum()), room)
            want += draw
            need -= int(draw.sum())  # >= 1 per loop: some class with room gets a draw
        parts[user] = np.concatenate([pools[k][taken[k]: taken[k] + want[k]] for k in range(num_classes)])
        taken += want
    return parts


def _ways_shots(labels: np.ndarray, num_users: int, num_classes: int, ways: int, shots: int, sigma: int,
                sizes: list[int] | None, rng: np.random.Generator) -> list[np.ndarray]:
    if ways < 1 or shots < 1 or sigma < 0:
        raise DataError(f"ways_shots needs ways >= 1, shots >= 1, sigma >= 0; got ways={ways}, "
                        f"shots={shots}, sigma={sigma}")
    if ways > num_classes:
        raise DataError(f"data.ways: {ways} classes per user, but the dataset has {num_classes}")
    hi_ways = min(ways + sigma, num_classes)  # sigma may reach past the classes; ways itself may not
    lo_ways = min(max(2, ways - sigma), hi_ways)
    pools = [rng.permutation(np.flatnonzero(labels == k)) for k in range(num_classes)]
    taken = np.zeros(num_classes, dtype=np.int64)
    avail = np.array([p.size for p in pools], dtype=np.int64)
    n_ways = rng.integers(lo_ways, hi_ways + 1, size=num_users)
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_users
    # with sizes, the largest users choose first: they are the ones that could find no room later
    order = range(num_users) if sizes is None else np.argsort(-np.asarray(sizes), kind="stable")
    for user in order:
        room = avail - taken
        if sizes is None:
            per_class = rng.integers(max(1, shots - sigma), shots + sigma + 1, size=n_ways[user])
            # classes that can serve any draw, so users share no samples
            candidates = np.flatnonzero(room >= shots + sigma)
            if candidates.size < n_ways[user]:
                raise DataError(
                    f"ways_shots: user {user} needs {n_ways[user]} classes with {shots + sigma} samples left, "
                    f"only {candidates.size} have (left per class: {room.tolist()}); "
                    f"lower shots={shots}, ways={ways} or the number of users ({num_users})")
            classes = rng.choice(candidates, n_ways[user], replace=False)
        else:
            classes, per_class = _classes_for_size(user, sizes[user], int(n_ways[user]), room, rng)
        chunks = [pools[k][taken[k]: taken[k] + c] for k, c in zip(classes, per_class)]
        taken[classes] += per_class
        parts[user] = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)
    return parts


def _classes_for_size(user: int, size: int, n_ways: int, room: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_ways`` classes (favouring those with most samples left) sharing ``size`` samples as evenly
    as their remaining samples allow."""
    open_classes = np.flatnonzero(room > 0)
    if open_classes.size < n_ways:
        raise DataError(f"ways_shots: user {user} needs {n_ways} classes but only {open_classes.size} "
                        "have samples left; lower ways or the sizes")
    weights = room[open_classes] / room[open_classes].sum()
    classes = rng.choice(open_classes, n_ways, replace=False, p=weights)
    classes = classes[np.argsort(room[classes], kind="stable")]
    per_class = np.zeros(n_ways, dtype=np.int64)
    need = size
    for j, k in enumerate(classes):  # water-filling: small classes give all they have, big ones the rest
        per_class[j] = min(int(room[k]), -(-need // (n_ways - j)))
        need -= int(per_class[j])
    if need > 0:
        raise DataError(f"ways_shots: user {user} needs {size} samples but its {n_ways} classes have only "
                        f"{size - need} left; lower the sizes or raise ways")
    return classes, per_class
