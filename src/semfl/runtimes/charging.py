"""What every transport shares: it, not the method, charges each payload to the link and checks
each reply (protocol.validation) before the method sees it."""
from __future__ import annotations

from typing import Any, Callable

from semfl.wireless.codecs import Payload
from semfl.protocol.transport import TransportBase
from semfl.wireless.link import Link
from semfl.protocol.validation import ReplyCheck


class LinkCharging(TransportBase):
    """Charges each request to its user's downlink and each reply to its uplink (exact codec bits,
    at that user's SNR of the round), and drops replies that fail ``reply_check`` (given at ``bind``):
    they are logged and listed in the round's ``rejected_users``, and the method aggregates the others.
    Subclasses set `link`."""

    link: Link

    @staticmethod
    def _request_for(user: int, payload: Payload | dict[int, Payload]) -> Payload:
        """The request for `user`: the broadcast payload or its own."""
        return payload[user] if isinstance(payload, dict) else payload

    def _downlink(self, user: int, payload: Payload | dict[int, Payload]) -> Payload:
        """The request for `user`, charged to its downlink."""
        request = self._request_for(user, payload)
        self.link.send(self.round, user, "downlink", request.bits())
        return request

    def _uplink(self, user: int, reply: Payload, replies: dict[int, Payload],
                on_reply: Callable[[int, Payload], None] | None, kind: str = "train") -> None:
        """Check a reply, charge it to the user's uplink, then keep it in `replies` or hand it to
        `on_reply`; a rejected reply is charged (it was sent) but goes no further."""
        check = self.reply_check or ReplyCheck()
        reason = check.problem(user, kind, reply)
        if reason is None or not reason.startswith("payload size cannot"):
            self.link.send(self.round, user, "uplink", reply.bits())
        if self.on_user_done is not None:
            self.on_user_done(user)
        if reason is not None:
            self.reject(user, kind, reason)
            return
        if on_reply is None:
            replies[user] = reply
        else:
            on_reply(user, reply)

    def reject(self, user: int, kind: str, reason: str) -> None:
        """Record a rejected reply for the round's metrics (``rejected_users``) and log it."""
        rejected: dict[int, list[dict[str, Any]]] = self.__dict__.setdefault("rejected", {})
        rejected.setdefault(self.round, []).append({"user": user, "kind": kind, "reason": reason})
        if self.log is not None:
            self.log(f"round {self.round}: rejected user {user}'s {kind!r} reply: {reason}")

    def rejected_info(self, round_: int) -> dict[str, Any]:
        rejected = self.__dict__.get("rejected", {}).get(round_, [])
        return {"rejected_users": list(rejected)} if rejected else {}
