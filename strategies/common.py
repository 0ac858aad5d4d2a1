"""Method-independent pieces shared by the strategies: traffic accounting, node sampling,
failure logging and the 2-D embedding of client uploads."""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Generic, TypeVar

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log

from fedspecialists.config import check_setting
from fedspecialists.faults import FaultDraw
from fedspecialists.protocol.identity import IdentityQuery, IdentityReply
from fedspecialists.protocol.packing import pack_content, unpack_content
from fedspecialists.protocol.records import FAULT_RECORD, content_nbytes
from fedspecialists.protocol.values import ProtocolError
from fedspecialists.trace import trace
from strategies.round_record import R

T = TypeVar("T")


REPLY_POLL_S = 0.2  # between two pulls of a phase's replies
# The ledger's phase of each message type the server sends (a folded evaluation's request
# travels in a training message and is counted as training).
LEDGER_PHASE = {
    MessageType.TRAIN: "train",
    MessageType.EVALUATE: "evaluate",
    MessageType.QUERY: "identify",
}


def exchange(
    grid: Any,
    messages: Iterable[Message],
    timeout: float,
    max_in_flight: int = 0,
    on_unsent: Callable[[list[Message]], None] | None = None,
) -> list[Message]:
    """Send ``messages`` and collect their replies until all are in or ``timeout`` (seconds).

    What ``grid.send_and_receive`` does, but a deployment's grid sleeps 3 s between two pulls
    (Flower 1.42), a wait added to every phase of every round whatever the clients took; here
    the replies are pulled every :data:`REPLY_POLL_S`. With ``max_in_flight`` > 0, at most that
    many messages await a reply at once, the next sent as each reply comes in
    (``federation.max_in_flight``: Flower 1.42's simulation engine scans every waiting message
    for every node ten times a second, so 1,000 messages at once cost it O(nodes x messages)).
    Messages still unsent when ``timeout`` runs out are never sent: they are logged and handed
    to ``on_unsent`` (the ledger takes their bytes back out).
    """
    pending = list(messages)
    window = max_in_flight if max_in_flight > 0 else max(1, len(pending))
    deadline = time.time() + timeout
    waiting: set[str] = set()
    replies: list[Message] = []
    while pending or waiting:
        if pending and len(waiting) < window:
            room = window - len(waiting)
            waiting |= set(grid.push_messages(pending[:room]))
            trace("pushed", messages=min(room, len(pending)))  # content on the SuperLink
            pending = pending[room:]
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {m.metadata.reply_to_message_id for m in pulled}
        if not (pending or waiting) or time.time() >= deadline:
            break
        time.sleep(REPLY_POLL_S)
    if pending:
        log(
            WARNING,
            "%d of %d messages never sent: reply timeout (%.0f s) reached with at most %d awaited",
            len(pending),
            len(pending) + len(waiting) + len(replies),
            timeout,
            window,
        )
        if on_unsent is not None:
            on_unsent(pending)
    return replies


@dataclass
class TrafficLedger:
    """Bytes that really travelled (serialized message contents), per node, phase and direction.

    ``phase`` is ``train`` or ``evaluate``; ``direction`` is ``down`` (server -> node) or ``up``.
    The ledger is where the server's messages leave: with ``pack_arrays`` it packs each one's
    ArrayRecords (:mod:`fedspecialists.protocol.packing`) and counts them as they travel.
    """

    pack_arrays: bool = False

    round_bytes: dict[tuple[str, str], dict[int, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    total_bytes: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    per_node_total: dict[int, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: {"down": 0, "up": 0})
    )

    def start_round(self) -> None:
        self.round_bytes = defaultdict(lambda: defaultdict(int))

    def to_state(self) -> dict[str, Any]:
        """The cumulative counts, JSON-able (a checkpoint's part; the round's are not kept)."""
        return {
            "total_bytes": {f"{p}/{d}": int(n) for (p, d), n in self.total_bytes.items()},
            "per_node_total": {str(node): dict(v) for node, v in self.per_node_total.items()},
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Go on from :meth:`to_state`'s counts."""
        for key, n in state["total_bytes"].items():
            phase, direction = key.split("/")
            self.total_bytes[(phase, direction)] = int(n)
        for node, v in state["per_node_total"].items():
            self.per_node_total[int(node)] = {"down": int(v["down"]), "up": int(v["up"])}

    def count(self, phase: str, direction: str, node_id: int, nbytes: int) -> None:
        self.round_bytes[(phase, direction)][node_id] += nbytes
        self.total_bytes[(phase, direction)] += nbytes
        self.per_node_total[node_id][direction] += nbytes

    def count_messages(self, phase: str, messages: Iterable[Message]) -> list[Message]:
        """Count outgoing messages (down), packed if the ledger packs, and return them."""
        out = list(messages)
        for message in out:
            if self.pack_arrays:
                message.content = pack_content(message.content)
            self.count(phase, "down", message.metadata.dst_node_id, content_nbytes(message.content))
        trace("sent", phase=phase, messages=len(out), group=out[0].metadata.group_id if out else "")
        return out

    def uncount_unsent(self, messages: Iterable[Message]) -> None:
        """Take back the bytes of messages counted when built but never sent (see
        :func:`exchange`); each one's phase is its message type's."""
        for message in messages:
            phase = LEDGER_PHASE[message.metadata.message_type]
            node = message.metadata.dst_node_id
            self.count(phase, "down", node, -content_nbytes(message.content))
            if not self.round_bytes[(phase, "down")][node]:
                del self.round_bytes[(phase, "down")][node]  # not a row of this round's bytes

    def count_replies(self, phase: str, replies: Iterable[Message]) -> list[Message]:
        """Count replies that carry content (up) and return them as a list."""
        out = list(replies)
        for reply in out:
            if not reply.has_error():
                self.count(phase, "up", reply.metadata.src_node_id, content_nbytes(reply.content))
        trace(
            "received", phase=phase, replies=len(out), group=out[0].metadata.group_id if out else ""
        )
        return out

    def round_summary(self) -> dict[str, object]:
        """This round's bytes by phase/direction, per node, and the cumulative totals."""
        summary: dict[str, object] = {}
        for (phase, direction), per_node in self.round_bytes.items():
            summary[f"{phase}_{direction}"] = int(sum(per_node.values()))
        summary["per_node"] = {
            str(node): {
                f"{phase}_{direction}": int(per_node.get(node, 0))
                for (phase, direction), per_node in self.round_bytes.items()
            }
            for node in sorted({n for per_node in self.round_bytes.values() for n in per_node})
        }
        summary["cumulative"] = {f"{p}_{d}": int(v) for (p, d), v in self.total_bytes.items()}
        summary["cumulative_per_node"] = {
            str(node): dict(v) for node, v in sorted(self.per_node_total.items())
        }
        return summary


def weighted_mean(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """Tensor-by-tensor weighted mean of parameter dicts (weights renormalised; None = uniform).

    Accumulates in float64 and returns each tensor in its input dtype.
    """
    if not states:
        raise ValueError("nothing to average")
    w = np.ones(len(states)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != len(states):
        raise ValueError(f"{len(w)} weights for {len(states)} parameter sets")
    if w.sum() <= 0:
        raise ValueError("weights must have a positive sum")
    w = w / w.sum()
    out = {}
    for key, first in states[0].items():
        total = np.zeros(np.shape(first), dtype=np.float64)
        for wi, state in zip(w, states, strict=True):
            total += wi * np.asarray(state[key], dtype=np.float64)
        out[key] = total.astype(np.asarray(first).dtype)
    return out


def sample_round_nodes(
    node_ids: Sequence[int],
    fraction: float,
    seed: int,
    client_of: Callable[[int], int] = int,
) -> list[int]:
    """A seeded sample of ``ceil(fraction * len(node_ids))`` nodes (all of them at fraction 1).

    Drawn over the nodes ordered by ``client_of`` (their client ids), so that the same clients
    are drawn whatever node ids a federation gave them; returned in that order.
    """
    nodes = sorted(node_ids, key=client_of)
    if fraction >= 1.0:
        return nodes
    count = max(1, math.ceil(fraction * len(nodes)))
    drawn = set(random.Random(seed).sample(range(len(nodes)), count))
    return [node for i, node in enumerate(nodes) if i in drawn]


def reply_content(reply: Message) -> RecordDict:
    """A reply's content with its packed ArrayRecords unpacked (:class:`ProtocolError` if one
    cannot be: the reply is then rejected like any malformed one)."""
    return unpack_content(reply.content)


def log_failed_reply(reply: Message, phase: str) -> None:
    """Log a node's failure (its ClientApp raised, or it timed out) without stopping the round."""
    log(
        WARNING,
        "%s reply from node %s failed and is skipped: %s",
        phase,
        reply.metadata.src_node_id,
        failure_reason(reply, limit=None),
    )


FAILURE_REASON_CHARS = 500  # a ClientApp's traceback can be long: its end says what failed


def failure_reason(reply: Message, limit: int | None = FAILURE_REASON_CHARS) -> str:
    """What a failed reply says went wrong: Flower's error reason, for the record its last
    ``limit`` characters (a traceback ends with the exception)."""
    reason = str(reply.error.reason) if reply.has_error() else "unknown"
    if limit is None or len(reason) <= limit:
        return reason
    return "..." + reason[-limit:]


def carries_fault(reply: Message) -> bool:
    """Whether a reply that came says it carries an injected fault (its ``fault`` record)."""
    return not reply.has_error() and FAULT_RECORD in reply.content.config_records


def injected_faults(replies: Iterable[Message]) -> dict[str, int]:
    """Faults injected on purpose (``client_app.faults``) among ``replies``, by kind: named by
    the error of a reply that failed, or by the ``fault`` record of one that came (metrics
    only: nothing is decided on them). Hangs never reply: they show as ``replies_missing``."""
    kinds: Counter[str] = Counter()
    for reply in replies:
        if reply.has_error():
            found = re.search(r"injected fault: (\w+)", reply.error.reason or "")
            if found:
                kinds[found.group(1)] += 1
        elif carries_fault(reply):
            kinds[str(reply.content.config_records[FAULT_RECORD].get("kind", "?"))] += 1
    return dict(sorted(kinds.items()))


def log_rejected_reply(node_id: int, phase: str, reason: str) -> None:
    log(WARNING, "%s reply from node %s rejected, not aggregated: %s", phase, node_id, reason)


def planar_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D PCA of ``features`` ``(M, D)`` -> ``(M, 2)`` for plotting uploads per round."""
    from sklearn.decomposition import PCA

    m, d = features.shape
    if m < 2 or d < 2 or float(features.var(axis=0).sum()) == 0.0:
        return np.zeros((m, 2))  # nothing to project (PCA would divide by zero variance)
    coords = PCA(n_components=2, random_state=seed).fit_transform(features)
    return np.asarray(coords)


def check_round_settings(fraction_train: float, min_replies: int) -> None:
    """Refuse round settings no strategy can run with (``ConfigError`` naming the setting)."""
    check_setting("federation.fraction_train", fraction_train)
    check_setting("federation.min_replies", min_replies)


# A parser of one reply's content: (reason it is rejected, or None; what the method keeps of it).
ReplyParser = Callable[[int, RecordDict], tuple[str | None, T]]


class RoundBookkeeping(Generic[R]):
    """The round plumbing both strategies share.

    Settings every strategy takes (seed, node sampling, ``min_replies``, the value bound of
    replies, the per-round callback), the traffic ledger, this round's record (``record``: a
    typed :class:`strategies.round_record.RoundRecord` of the method's own kind, one line of
    ``metrics.jsonl``, filled as the round goes), the history of finished rounds, opening a
    training round, screening replies and closing a round. A subclass calls
    :meth:`init_rounds` with its record type in its constructor and implements ``describe()``.
    """

    record_type: type[R]

    ledger: TrafficLedger
    fraction_train: float
    min_replies: int
    max_abs_value: float
    seed: int
    on_round_end: Callable[[dict[str, Any]], None] | None
    absent_clients: FaultDraw | None
    history: list[R]
    record: R
    deferred: R | None  # a round whose evaluation the next round's training brings
    client_ids: dict[int, int]  # node id -> client id (protocol.identity)

    def init_rounds(
        self,
        record_type: type[R],
        seed: int,
        fraction_train: float,
        min_replies: int,
        max_abs_value: float,
        on_round_end: Callable[[dict[str, Any]], None] | None,
        absent_clients: FaultDraw | None = None,
        pack_arrays: bool = True,
    ) -> None:
        """Check and keep the shared settings; start the clocks, ledger and history.

        ``record_type`` is the method's round record (:class:`RoundRecord` or a subclass);
        ``absent_clients``: client ids never sampled for training in a round (``faults.kind=
        absent``); ``pack_arrays``: messages' ArrayRecords travel packed (``federation.
        pack_arrays``).
        """
        check_round_settings(fraction_train, min_replies)
        self.record_type = record_type
        self.seed = seed
        self.fraction_train = fraction_train
        self.min_replies = min_replies
        self.max_abs_value = max_abs_value
        self.on_round_end = on_round_end
        self.absent_clients = absent_clients
        self.ledger = TrafficLedger(pack_arrays=pack_arrays)
        self.history = []
        self.record = record_type(round=0)
        self.deferred = None
        self.client_ids = {}
        self._sampled = 0  # nodes sampled for this round's training
        self._faulty_nodes: set[int] = set()  # replies of this round that carried a fault record
        self._t_start = self._t_round = time.time()

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- checkpoint ------------------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything needed to go on after the last closed round: ``(arrays, JSON state)``.

        The shared part (history, traffic, elapsed time) here; the method's own from
        :meth:`method_checkpoint`.
        """
        arrays, state = self.method_checkpoint()
        state["rounds"] = {
            "history": [record.to_json() for record in self.history],
            "ledger": self.ledger.to_state(),
            "wall_time_s": time.time() - self._t_start,
            "deferred": None if self.deferred is None else self.deferred.to_json(),
        }
        return arrays, state

    def restore(self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        """Go on from :meth:`checkpoint`'s output (a freshly built strategy, same settings)."""
        rounds = state["rounds"]
        self.history = [self.record_type.from_json(record) for record in rounds["history"]]
        deferred = rounds.get("deferred")  # absent from checkpoints before the option
        self.deferred = None if deferred is None else self.record_type.from_json(deferred)
        self.ledger.load_state(rounds["ledger"])
        self._t_start = time.time() - float(rounds["wall_time_s"])
        self.method_restore(arrays, state)

    def method_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        raise NotImplementedError

    def method_restore(self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def summary(self) -> None:
        log(INFO, "%s settings: %s", type(self).__name__, self.describe())

    def client_of(self, node: int) -> int:
        """The client id of ``node`` (its node id until it has said, or if it never does)."""
        return self.client_ids.get(node, node)

    def identify_nodes(
        self, server_round: int, grid: Any, timeout: float, max_in_flight: int = 0
    ) -> None:
        """Ask the nodes not met yet for their client id (one small query message each).

        A node that does not answer is asked again next round. One that claims a client id held
        by a node no longer connected takes it over (a restarted SuperNode is the same client);
        one that claims a client id a connected node holds keeps its node id (logged): ids must
        stay unique.
        """
        live = set(grid.get_node_ids())
        nodes = [n for n in sorted(live) if n not in self.client_ids]
        if not nodes:
            return
        query = [
            Message(
                content=IdentityQuery(server_round).to_record(),
                message_type=MessageType.QUERY,
                dst_node_id=node,
            )
            for node in nodes
        ]
        for reply in self.ledger.count_replies(
            "identify",
            exchange(
                grid,
                self.ledger.count_messages("identify", query),
                timeout,
                max_in_flight,
                self.ledger.uncount_unsent,
            ),
        ):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise ProtocolError(reply.error.reason)
                client = IdentityReply.from_record(reply.content).client_id
            except ProtocolError as exc:
                log(WARNING, "node %s did not say which client it is: %s", node, exc)
                continue
            self.client_ids[node] = self._claim(node, client, live)

    def _claim(self, node: int, client: int, live: set[int]) -> int:
        """The client id ``node`` is keyed by when it says it is ``client``."""
        holder = next((n for n, c in self.client_ids.items() if c == client and n != node), None)
        if holder is None:
            return client
        if holder not in live:
            log(INFO, "node %s is client %s again (node %s has left)", node, client, holder)
            del self.client_ids[holder]
            return client
        log(WARNING, "node %s claims client id %s, already taken: keyed by node id", node, client)
        return node

    def open_round(self, server_round: int) -> None:
        """Start the round's clock, traffic count and record (the round loop calls it first)."""
        self._t_round = time.time()
        self.ledger.start_round()
        self.record = self.record_type(round=server_round)

    def begin_train_round(self, server_round: int, grid: Any) -> list[int]:
        """Open the round (if the round loop has not) and return the nodes sampled for it."""
        if self.record.round != server_round:
            self.open_round(server_round)
        nodes = sample_round_nodes(
            list(grid.get_node_ids()), self.fraction_train, self.seed + server_round, self.client_of
        )
        if self.absent_clients is not None:  # left out on purpose, as if they had crashed
            gone = self.absent_clients.clients(server_round)
            nodes = [node for node in nodes if self.client_of(node) not in gone]
            self.record.clients_absent = len(gone)
        self._sampled = len(nodes)
        return nodes

    def screen_replies(
        self, phase: str, replies: Iterable[Message], parse: ReplyParser[T]
    ) -> list[tuple[int, T]]:
        """Count the replies' bytes; log and count failed and rejected ones in the record.

        Returns ``(node id, parsed)`` for every reply ``parse`` accepts, ordered by client id
        (arrival order must not change a float sum); a rejected one never reaches the caller.
        """
        accepted: list[tuple[int, T]] = []
        rejected = rejected_faulty = 0
        reasons: list[str] = []
        failures: list[str] = []
        received = self.ledger.count_replies(phase, replies)
        for reply in received:
            if reply.has_error():
                log_failed_reply(reply, phase)
                failures.append(failure_reason(reply))
                continue
            node = reply.metadata.src_node_id
            try:
                content = reply_content(reply)
            except ProtocolError as exc:
                reason: str | None = str(exc)
            else:
                reason, parsed = parse(node, content)
            if reason is not None:
                log_rejected_reply(node, phase, reason)
                rejected += 1
                rejected_faulty += carries_fault(reply)
                reasons.append(reason)
                continue
            accepted.append((node, parsed))
        accepted.sort(key=lambda item: self.client_of(item[0]))
        self.record.replies_ok = len(accepted)
        self.record.replies_failed = len(failures)
        self.record.replies_rejected = rejected
        if phase == "train":  # sampled nodes whose reply never came (timed out, or gone)
            self.record.replies_missing = max(0, self._sampled - len(received))
        if reasons:
            self.record.rejected_reasons = reasons
        if failures:
            self.record.failed_reasons = failures
        injected = injected_faults(received)
        if injected:
            self.record.faults_injected = injected
            self.record.rejected_injected = rejected_faulty
        self._faulty_nodes = {r.metadata.src_node_id for r in received if carries_fault(r)}
        return accepted

    def record_dropped(self, dropped: Sequence[tuple[int, str]]) -> None:
        """Log and count updates left out of their aggregate (``robust.drop_opposed_updates``):
        ``(node id, reason)`` each, the reason naming whose update, its group and its cosine.
        How many came from replies that carried an injected fault is counted for the metrics
        only (``dropped_injected``), like the fault counts."""
        for _, reason in dropped:
            log(WARNING, "update left out of aggregation: %s", reason)
        self.record.updates_dropped = len(dropped)
        if dropped:
            self.record.dropped_reasons = [reason for _, reason in dropped]
        if self._faulty_nodes:
            self.record.dropped_injected = sum(node in self._faulty_nodes for node, _ in dropped)

    def record_clipped(self, clipped: Sequence[tuple[int, str]]) -> None:
        """Log and count updates whose norm the configured clipping cut: ``(node id, reason)``
        each, the reason naming whose update, its group and its norm before and after.
        ``clipped_injected`` as ``dropped_injected``. Adds to the round's count (FL-TAC
        records cluster by cluster)."""
        for _, reason in clipped:
            log(INFO, "update clipped: %s", reason)
        record = self.record
        record.updates_clipped = (record.updates_clipped or 0) + len(clipped)
        if clipped:
            record.clipped_reasons = [*(record.clipped_reasons or []), *(r for _, r in clipped)]
        if self._faulty_nodes:
            injected = sum(node in self._faulty_nodes for node, _ in clipped)
            record.clipped_injected = (record.clipped_injected or 0) + injected

    def too_few_replies(self, server_round: int, valid: int, usable: bool = True) -> bool:
        """Whether the round's aggregation is skipped (fewer than ``min_replies`` valid replies,
        or nothing ``usable`` in them); logged and recorded as ``aggregated: false``."""
        if valid >= self.min_replies and usable:
            return False
        log(
            WARNING,
            "round %s: %s valid replies (< min_replies=%s): aggregation skipped",
            server_round,
            valid,
            self.min_replies,
        )
        self.record.aggregated = False
        return True

    def defer_evaluation(self) -> None:
        """Keep this round's record open for its evaluation, which comes with the next round's
        training replies (``federation.fold_evaluation``). The round's time and bytes are
        its own, up to now: its evaluation's bytes count in the round that carries them."""
        self.record.round_time_s = time.time() - self._t_round
        self.record.bytes = self.ledger.round_summary()
        self.record.evaluated_in_round = self.record.round + 1
        self.deferred = self.record

    def close_deferred(self, evaluate: Callable[[], object]) -> None:
        """Close the deferred round's record by ``evaluate`` (the strategy's
        ``aggregate_evaluate`` on its replies), then go on with the current round's."""
        deferred = self.deferred if self.deferred is not None else self.record_type(round=0)
        current, self.record, self.deferred = self.record, deferred, None
        try:
            evaluate()
        finally:
            self.record = current

    def close_round(self) -> R:
        """Add times and bytes to the record (its evaluation's fields set); keep and report it."""
        now = time.time()
        self.record.wall_time_s = now - self._t_start
        # A deferred round's time and bytes were set when its training ended.
        if self.record.round_time_s is None:
            self.record.round_time_s = now - self._t_round
        if self.record.bytes is None:
            self.record.bytes = self.ledger.round_summary()
        if self.on_round_end is not None:
            self.on_round_end(self.record.to_json())
        self.record.drop_filed_apart()  # written to its own file; memory stays flat over rounds
        self.history.append(self.record)
        return self.record
