"""The contract between a method's base-station loop and whatever carries its requests to users.

A method only ever calls ``send`` / ``send_batched`` / ``fetch_state`` and reads ``round`` and
``workers``; the runner only calls ``bind``, ``start_round``, ``round_info``, ``state_dict`` /
``load_state_dict`` and ``checkpoint_saved``. :class:`TransportBase` gives every optional part a
no-op default, so no caller has to probe a transport with ``hasattr``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, runtime_checkable

from semfl.protocol.context import Handler
from semfl.protocol.validation import ReplyCheck
from semfl.wireless.codecs import Payload

Replies = dict[int, Payload]
OnReply = Callable[[int, Payload], None]


@runtime_checkable
class Transport(Protocol):
    round: int  # the round being served (set by start_round)
    workers: int  # processes serving one request's users (1 = one at a time)

    def bind(self, handlers: dict[str, Handler], on_user_done: Callable[[int], None] | None = None,
             reply_check: ReplyCheck | None = None, log: Callable[[str], None] | None = None) -> None: ...

    def start_round(self, round_: int) -> None: ...

    def send(self, users: Iterable[int], kind: str, payload: Payload | dict[int, Payload],
             on_reply: OnReply | None = None) -> Replies: ...

    def send_batched(self, users: Iterable[int], kind: str, payload: Payload | dict[int, Payload],
                     on_reply: OnReply | None = None) -> Replies: ...

    def fetch_state(self, user: int, keys: Iterable[str]) -> dict[str, Any] | None: ...

    def round_info(self, round_: int) -> dict[str, Any]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def checkpoint_saved(self) -> None: ...


class TransportBase:
    """Defaults for the optional parts of :class:`Transport`."""

    round: int = 0
    workers: int = 1
    handlers: dict[str, Handler]
    on_user_done: Callable[[int], None] | None = None
    reply_check: ReplyCheck | None = None  # what a valid reply looks like (protocol.validation)
    log: Callable[[str], None] | None = None

    def bind(self, handlers: dict[str, Handler], on_user_done: Callable[[int], None] | None = None,
             reply_check: ReplyCheck | None = None, log: Callable[[str], None] | None = None) -> None:
        """Give the transport the method's user handlers, a callback per served user, the check every
        reply passes before the method sees it, and where to log (a transport with its own log keeps it)."""
        self.handlers = dict(handlers)
        self.on_user_done = on_user_done
        self.reply_check = reply_check
        if self.log is None:
            self.log = log

    def start_round(self, round_: int) -> None:
        self.round = round_

    def send_batched(self, users: Iterable[int], kind: str, payload: Payload | dict[int, Payload],
                     on_reply: OnReply | None = None) -> Replies:
        """Serve the users one by one: transports that can batch users override this."""
        return self.send(users, kind, payload, on_reply)

    def round_info(self, round_: int) -> dict[str, Any]:
        """Round-level facts the transport observed (missing users, node errors): none by default."""
        return {}

    def checkpoint_saved(self) -> None:
        """The checkpoint holding the last ``state_dict`` is on disk."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class UsersOnlyTransport(TransportBase):
    """The transport of a method's users' half (the instance whose handlers serve users, on a Flower
    node or in the local runtime): users answer requests, they never send one."""

    def send(self, *args, **kwargs):
        raise RuntimeError("a method's users' half cannot send requests: only the base station's loop does")

    fetch_state = send
