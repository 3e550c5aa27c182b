"""What every transport shares: it, not the method, charges each payload to the link."""
from __future__ import annotations

from typing import Callable

from semfl.wireless.codecs import Payload
from semfl.protocol.transport import TransportBase
from semfl.wireless.link import Link


class LinkCharging(TransportBase):
    """Charges each request to its user's downlink and each reply to its uplink (exact codec bits,
    at that user's SNR of the round). Subclasses set `link`."""

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
                on_reply: Callable[[int, Payload], None] | None) -> None:
        """Charge a reply to the user's uplink, then keep it in `replies` or hand it to `on_reply`."""
        self.link.send(self.round, user, "uplink", reply.bits())
        if self.on_user_done is not None:
            self.on_user_done(user)
        if on_reply is None:
            replies[user] = reply
        else:
            on_reply(user, reply)
