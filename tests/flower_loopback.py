"""A Flower Grid that delivers messages to a ClientApp in this process: no Ray, no servers.

It runs the real Flower adapter (the generic ServerApp loop, the generic ClientApp, Flower
messages and records through Flower's protobuf serialisation) in one process: the tests use it to
check every method over the adapter without servers. Nodes can be marked dead to exercise the fault
path.
"""
from __future__ import annotations

from typing import Any, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid


class LoopbackGrid(Grid):
    def __init__(self, client_app, node_configs: list[dict[str, Any]], run_config: dict[str, Any] | None = None):
        self.client_app = client_app
        self.contexts = {1000 + i: Context(run_id=1, node_id=1000 + i, node_config=dict(cfg), state=RecordDict(),
                                           run_config=dict(run_config or {}))
                         for i, cfg in enumerate(node_configs)}
        self.dead: set[int] = set()
        self.delivered = 0
        self._replies: dict[str, Message] = {}
        self._run = None
        from flwr.supercore.task_identity import TaskIdentity

        from flwr.common.constant import SUPERLINK_NODE_ID

        if TaskIdentity._run_id is None:  # what a ServerApp process has set before its main runs
            TaskIdentity.run_id = 1
        if TaskIdentity._node_id is None:
            TaskIdentity.node_id = SUPERLINK_NODE_ID
        if TaskIdentity._task_id is None:
            TaskIdentity.task_id = 1

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.dead]

    def kill(self, user_node: int) -> None:
        """Stop answering, as a node that died: its messages are never delivered."""
        self.dead.add(user_node)

    def _deliver(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if node in self.dead or node not in self.contexts:
            return None
        wire = message_from_proto(message_to_proto(message))  # what crosses the network
        try:
            reply = self.client_app(wire, self.contexts[node])
        except Exception as exc:  # a failing ClientApp answers with an error, as on a SuperNode
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=wire)
        self.delivered += 1
        return message_from_proto(message_to_proto(reply))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            reply = self._deliver(message)
            key = message.object_id
            if reply is not None:
                self._replies[key] = reply
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))
