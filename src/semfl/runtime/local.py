"""The local transport: users live in this process; payloads are handed over without serialising.

The transport, not the method, charges every payload to the link: the downlink bits of each
request and the uplink bits of each reply, per user and round, at that user's SNR.
Per-user persistent state stays here between rounds (on the CPU; a method moves what it needs
to the device for the active user only).
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from semfl.codecs import Payload
from semfl.link import Link
from semfl.runtime import seeding
from semfl.runtime.transport import LinkCharging

Handler = Callable[["UserContext", Payload], Payload]


@dataclass
class UserContext:
    user: int
    round: int
    x: torch.Tensor  # local images, float NCHW on the run device
    y: torch.Tensor  # local labels
    snr_db: float  # this user's link SNR this round (also its training channel SNR by default)
    state: dict[str, Any]  # persistent across rounds: mentors, residuals, masks, ...
    seed: int  # derived for (run seed, round, user, request kind)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def generator(self, purpose: str = "") -> torch.Generator:
        return seeding.generator(self.seed, purpose)


def _nbytes(value: Any) -> int:
    """Bytes held by the tensors in a (nested) state."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class UserStates(MutableMapping):
    """Per-user persistent state (user -> dict), optionally capped in memory.

    With ``cap_bytes > 0``, after each user is served the least recently used idle users' states
    are written with ``torch.save`` to a temporary folder (under ``spill_parent``, e.g. the run
    directory; removed when this object goes) until the states held in memory fit the cap; a
    spilled state is read back the next time it is looked up (``states[user]``), so methods see
    an ordinary mapping. A single state larger than the cap stays in memory while it is in use.
    Sizes count tensor bytes only.
    """

    def __init__(self, users: int, cap_bytes: int = 0, spill_parent: str | Path | None = None):
        self._mem: OrderedDict[int, dict[str, Any]] = OrderedDict((k, {}) for k in range(users))
        self._disk: dict[int, Path] = {}
        self._sizes: dict[int, int] = {}
        self.cap_bytes = int(cap_bytes)
        self._spill_parent = spill_parent
        self._dir: Path | None = None
        self.spills = 0  # number of states written to disk so far
        self.loads = 0

    def _spill_dir(self) -> Path:
        if self._dir is None:
            parent = None
            if self._spill_parent is not None:
                Path(self._spill_parent).mkdir(parents=True, exist_ok=True)
                parent = str(self._spill_parent)
            self._dir = Path(tempfile.mkdtemp(prefix="state-spill-", dir=parent))
            weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        return self._dir

    def __getitem__(self, user: int) -> dict[str, Any]:
        if user in self._disk:
            path = self._disk.pop(user)
            self._mem[user] = torch.load(path, weights_only=False)
            path.unlink(missing_ok=True)
            self.loads += 1
        state = self._mem[user]
        self._mem.move_to_end(user)
        return state

    def __setitem__(self, user: int, state: dict[str, Any]) -> None:
        path = self._disk.pop(user, None)
        if path is not None:
            path.unlink(missing_ok=True)
        self._mem[user] = state
        self._sizes.pop(user, None)

    def __delitem__(self, user: int) -> None:
        path = self._disk.pop(user, None)
        if path is not None:
            path.unlink(missing_ok=True)
        else:
            del self._mem[user]
        self._sizes.pop(user, None)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(set(self._mem) | set(self._disk)))

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    def in_memory_bytes(self) -> int:
        return sum(self._sizes.setdefault(k, _nbytes(v)) for k, v in self._mem.items())

    def enforce(self, touched: Iterable[int] = (), keep: Iterable[int] = ()) -> None:
        """Re-measure the ``touched`` users' states and spill idle ones (not in ``keep``) over the cap."""
        for user in touched:
            self._sizes.pop(user, None)
        if self.cap_bytes <= 0:
            return
        keep = set(keep)
        total = self.in_memory_bytes()
        for user in list(self._mem):  # least recently used first
            if total <= self.cap_bytes:
                break
            size = self._sizes[user]
            if user in keep or size == 0:
                continue
            path = self._spill_dir() / f"user-{user}.pt"
            torch.save(self._mem.pop(user), path)
            self._disk[user] = path
            self._sizes.pop(user, None)
            self.spills += 1
            total -= size

    def to_dict(self) -> dict[int, dict[str, Any]]:
        """Every state as a plain dict (spilled ones are read from disk, and stay there)."""
        return {k: (torch.load(self._disk[k], weights_only=False) if k in self._disk else self._mem[k]) for k in self}


class LocalTransport(LinkCharging):
    def __init__(self, link: Link, user_data: list[tuple[torch.Tensor, torch.Tensor]], seed: int,
                 device: torch.device, handlers: dict[str, Handler], state_memory_mb: float = 0.0,
                 spill_dir: str | Path | None = None):
        """``state_memory_mb`` > 0 caps the per-user state held in memory; idle users' states
        beyond it are spilled to a temporary folder under ``spill_dir`` (see :class:`UserStates`)."""
        self.link = link
        self.user_data = user_data
        self.seed = seed
        self.device = device
        self.handlers = handlers
        self.state_memory_mb = state_memory_mb
        self.spill_dir = spill_dir
        self.states = UserStates(len(user_data), int(state_memory_mb * 2 ** 20), spill_dir)
        self.round = 0
        self.on_user_done: Callable[[int], None] | None = None

    @property
    def num_users(self) -> int:
        return len(self.user_data)

    def context(self, user: int, kind: str) -> UserContext:
        x, y = self.user_data[user]
        return UserContext(user=user, round=self.round, x=x, y=y, snr_db=self.link.snr_db(self.round, user),
                           state=self.states[user], seed=seeding.derive_seed(self.seed, self.round, user, kind),
                           device=self.device)

    def send(self, users: Iterable[int], kind: str, payload: Payload | dict[int, Payload],
             on_reply: Callable[[int, Payload], None] | None = None) -> dict[int, Payload]:
        """Send a request to each user and collect the replies.

        `payload` is one broadcast payload (charged to every user's downlink) or one per user.
        With `on_reply`, each reply is handed over as it arrives and not kept, so a base station
        can aggregate as a running sum instead of holding K updates.
        """
        if kind not in self.handlers:
            raise KeyError(f"no user handler for request kind {kind!r} (have: {', '.join(sorted(self.handlers))})")
        handler = self.handlers[kind]
        replies: dict[int, Payload] = {}
        for user in users:
            request = self._downlink(user, payload)
            ctx = self.context(user, kind)
            seeding.enter(ctx.seed)
            reply = handler(ctx, request)
            self.states.enforce(touched=[user])
            self._uplink(user, reply, replies, on_reply)
        return replies

    def send_batched(self, users: Iterable[int], kind: str, payload: Payload | dict[int, Payload],
                     on_reply: Callable[[int, Payload], None] | None = None) -> dict[int, Payload]:
        """Like :meth:`send`, but all users are handled by one call of the ``kind + ":batched"``
        handler, which takes the list of contexts and the list of requests and returns the list
        of replies (e.g. users trained together under ``torch.func.vmap``).

        The link is charged per user exactly as in :meth:`send`. Falls back to :meth:`send` when
        the method has no batched handler for ``kind``. The batched handler, not the transport,
        seeds each user's randomness (``seeding.enter(ctx.seed)``) where it draws it.
        """
        batched = self.handlers.get(kind + ":batched")
        if batched is None:
            return self.send(users, kind, payload, on_reply)
        users = list(users)
        requests = [self._downlink(user, payload) for user in users]
        contexts = [self.context(user, kind) for user in users]
        out = batched(contexts, requests)
        self.states.enforce(touched=users)
        if len(out) != len(users):
            raise RuntimeError(f"batched handler {kind!r} returned {len(out)} replies for {len(users)} users")
        replies: dict[int, Payload] = {}
        for user, reply in zip(users, out):
            self._uplink(user, reply, replies, on_reply)
        return replies

    def fetch_state(self, user: int, keys: Iterable[str]) -> dict[str, Any]:
        """The entries `keys` of a user's persistent state that exist (for evaluation and final
        figures: instrumentation, not protocol, so not charged to the link). Over Flower this is a
        query to the user's node; methods treat the result as read-only."""
        state = self.states[user]
        return {k: state[k] for k in keys if k in state}

    def state_dict(self) -> dict:
        return {"states": self.states.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.states = UserStates(len(self.user_data), int(self.state_memory_mb * 2 ** 20), self.spill_dir)
        for user, value in state["states"].items():
            self.states[user] = value
        self.states.enforce()
