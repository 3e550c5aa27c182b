"""The local transport: users live in this process; payloads are handed over without serialising.

The transport, not the method, charges every payload to the link: the downlink bits of each
request and the uplink bits of each reply, per user and round, at that user's SNR.
Per-user persistent state stays here between rounds (on the CPU; a method moves what it needs
to the device for the active user only).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import MutableMapping

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from semfl.wireless.codecs import Payload
from semfl.wireless.link import Link
from semfl.protocol import seeding
from semfl.files import atomic_write
from semfl.protocol.context import Handler, UserContext
from semfl.runtimes.charging import LinkCharging

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

    Checkpoints (``write_files`` / ``load_files``) keep one file per user, so neither writing nor
    resuming a checkpoint loads every state at once: a spilled state is hard-linked, an unchanged
    one (not looked up since the last checkpoint) is referenced again, and after a resume each
    state is read from its checkpoint file only when first looked up.
    """

    def __init__(self, users: int, cap_bytes: int = 0, spill_parent: str | Path | None = None):
        self._mem: OrderedDict[int, dict[str, Any]] = OrderedDict((k, {}) for k in range(users))
        self._disk: dict[int, Path] = {}  # spilled by us: deleted once read back
        self._borrowed: dict[int, Path] = {}  # checkpoint files: read back, never deleted here
        self._saved: dict[int, str | None] = {}  # checkpoint file holding the unchanged state
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
        elif user in self._borrowed:
            self._mem[user] = torch.load(self._borrowed.pop(user), weights_only=True)  # a checkpoint's file
            self.loads += 1
        self._saved.pop(user, None)  # the caller may change the state in place
        state = self._mem[user]
        self._mem.move_to_end(user)
        return state

    def peek(self, user: int) -> dict[str, Any]:
        """A user's state without touching the bookkeeping (a spilled state is read, its file kept):
        for a forked worker, whose changes come back through ``states[user] = new``."""
        on_disk = self._disk.get(user) or self._borrowed.get(user)
        return torch.load(on_disk, weights_only=False) if on_disk is not None else self._mem[user]

    def __setitem__(self, user: int, state: dict[str, Any]) -> None:
        path = self._disk.pop(user, None)
        if path is not None:
            path.unlink(missing_ok=True)
        self._borrowed.pop(user, None)
        self._saved.pop(user, None)
        self._mem[user] = state
        self._mem.move_to_end(user)  # just served (a worker's reply): the most recently used
        self._sizes.pop(user, None)

    def __delitem__(self, user: int) -> None:
        path = self._disk.pop(user, None)
        if path is not None:
            path.unlink(missing_ok=True)
        elif self._borrowed.pop(user, None) is None:
            del self._mem[user]
        self._saved.pop(user, None)
        self._sizes.pop(user, None)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(set(self._mem) | set(self._disk) | set(self._borrowed)))

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk) + len(self._borrowed)

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
        on_disk = {**self._disk, **self._borrowed}
        return {k: (torch.load(on_disk[k], weights_only=False) if k in on_disk else self._mem[k]) for k in self}

    def write_files(self, directory: Path, tag: str) -> dict[int, str | None]:
        """Write each changed state to ``directory/user-<k>-<tag>.pt`` (None: an empty state, no file);
        returns the manifest user -> file name. One state in memory at a time."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        manifest: dict[int, str | None] = {}
        for user in self:
            if user in self._saved:
                manifest[user] = self._saved[user]
                continue
            if user in self._borrowed:  # read from this checkpoint folder and not looked up since
                manifest[user] = self._borrowed[user].name
                self._saved[user] = manifest[user]
                continue
            name = f"user-{user}-{tag}.pt"
            if user in self._disk:
                _link_durably(self._disk[user], directory / name)
            elif self._mem[user]:
                atomic_write(directory / name, lambda handle, state=self._mem[user]: torch.save(state, handle))
            else:
                name = None
            manifest[user] = self._saved[user] = name
        return manifest

    def load_files(self, directory: Path, manifest: dict[int, str | None]) -> None:
        """Take the states of a checkpoint manifest; each file is read when its user is first looked up."""
        for user, name in manifest.items():
            user = int(user)
            if name is None:
                self[user] = {}
            else:
                path = Path(directory) / name
                if not path.is_file():
                    raise RuntimeError(f"checkpoint: user {user}'s state file {path} is missing")
                self._mem.pop(user, None)
                self._borrowed[user] = path
            self._saved[user] = name

    @staticmethod
    def prune_files(directory: Path, manifest: dict[int, str | None]) -> None:
        """Delete the state files of older checkpoints (call once the checkpoint naming ``manifest`` is on disk)."""
        keep = {name for name in manifest.values() if name}
        for path in Path(directory).glob("user-*.pt"):
            if path.name not in keep:
                path.unlink(missing_ok=True)


def _link_durably(source: Path, target: Path) -> None:
    """``target`` becomes a durable copy of ``source`` (a hard link where the file system allows)."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)


class LocalTransport(LinkCharging):
    def __init__(self, link: Link, user_data: list[tuple[torch.Tensor, torch.Tensor]], seed: int,
                 device: torch.device, handlers: dict[str, Handler], state_memory_mb: float = 0.0,
                 spill_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                 workers: int = 1):
        """``state_memory_mb`` > 0 caps the per-user state held in memory; idle users' states
        beyond it are spilled to a temporary folder under ``spill_dir`` (see :class:`UserStates`).
        With ``checkpoint_dir``, checkpoints keep the users' states there, one file per user,
        and ``state_dict`` holds only their names. ``workers`` > 1 serves the users of a request
        in that many forked processes (:mod:`semfl.runtimes.workers`; CPU only)."""
        self.link = link
        self.user_data = user_data
        self.seed = seed
        self.device = device
        self.handlers = handlers
        self.state_memory_mb = state_memory_mb
        self.spill_dir = spill_dir
        self.states = UserStates(len(user_data), int(state_memory_mb * 2 ** 20), spill_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._manifest: dict[int, str | None] | None = None
        self.workers = workers
        if workers > 1 and torch.cuda.is_available():  # (a cuda device implies this too)
            # Sionna initialises CUDA whenever it reseeds on a machine with a GPU, even for cpu runs
            raise ValueError(f"engine.workers = {workers}: worker processes are forked, which CUDA does not "
                             "survive, and this machine has a GPU: use engine.workers = 1 (on a GPU, "
                             "train.vmap trains users together)")

    @property
    def num_users(self) -> int:
        return len(self.user_data)

    def context(self, user: int, kind: str, peek: bool = False) -> UserContext:
        x, y = self.user_data[user]
        state = self.states.peek(user) if peek else self.states[user]
        return UserContext(user=user, round=self.round, x=x, y=y, snr_db=self.link.snr_db(self.round, user),
                           state=state, seed=seeding.derive_seed(self.seed, self.round, user, kind),
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
        users = list(users)
        if self.workers > 1 and len(users) > 1:
            self._send_parallel(users, kind, handler, payload, replies, on_reply)
            return replies
        for user in users:
            request = self._downlink(user, payload)
            ctx = self.context(user, kind)
            seeding.enter(ctx.seed)
            reply = handler(ctx, request)
            self.states.enforce(touched=[user])
            self._uplink(user, reply, replies, on_reply, kind)
        return replies

    def _send_parallel(self, users: list[int], kind: str, handler: Handler, payload: Payload | dict[int, Payload],
                       replies: dict[int, Payload], on_reply: Callable[[int, Payload], None] | None) -> None:
        """:meth:`send` with the handlers run in forked workers; the link, the states and
        ``on_reply`` are served here, user by user in order, as in the sequential loop."""
        from semfl.runtimes.workers import serve_users

        def serve(user: int) -> tuple[Payload, dict[str, Any]]:  # runs in a worker
            ctx = self.context(user, kind, peek=True)
            seeding.enter(ctx.seed)
            return handler(ctx, self._request_for(user, payload)), ctx.state

        for user, reply, state in serve_users(users, serve, self.workers):
            self._downlink(user, payload)
            self.states[user] = state
            self.states.enforce(touched=[user])
            self._uplink(user, reply, replies, on_reply, kind)

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
            self._uplink(user, reply, replies, on_reply, kind)
        return replies

    def round_info(self, round_: int) -> dict[str, Any]:
        """The round's rejected replies, if any (for its global metrics row)."""
        return self.rejected_info(round_)

    def fetch_state(self, user: int, keys: Iterable[str]) -> dict[str, Any]:
        """The entries `keys` of a user's persistent state that exist (for evaluation and final
        figures: instrumentation, not protocol, so not charged to the link). Over Flower this is a
        query to the user's node; methods treat the result as read-only."""
        state = self.states[user]
        return {k: state[k] for k in keys if k in state}

    def state_dict(self) -> dict:
        if self.checkpoint_dir is None:
            return {"states": self.states.to_dict()}
        self._manifest = self.states.write_files(self.checkpoint_dir, f"r{self.round}")
        return {"state_files": dict(self._manifest)}

    def checkpoint_saved(self) -> None:
        """The checkpoint holding the last ``state_dict`` is on disk: older state files can go."""
        if self.checkpoint_dir is not None and self._manifest is not None:
            self.states.prune_files(self.checkpoint_dir, self._manifest)

    def load_state_dict(self, state: dict) -> None:
        self.states = UserStates(len(self.user_data), int(self.state_memory_mb * 2 ** 20), self.spill_dir)
        if "state_files" in state:
            if self.checkpoint_dir is None:
                raise RuntimeError("checkpoint: the users' states are in separate files, but no checkpoint folder is set")
            self.states.load_files(self.checkpoint_dir, state["state_files"])
            return
        for user, value in state["states"].items():
            self.states[user] = value
        self.states.enforce()
