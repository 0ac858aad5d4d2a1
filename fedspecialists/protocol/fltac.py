"""FL-TAC's messages (and its baselines'): the server's instruction and the nodes' replies.

Every record name and key of the adapter methods lives here; the strategy, the ClientApp and
the tests write and read messages through these classes. Reading a message that breaks the
protocol raises :class:`~fedspecialists.protocol.values.ProtocolError` with the reason.

Content of each message (record kind, name: keys)::

    Instruction   config "config": server-round, keep-local, send-fingerprint,
                  send-label-fingerprint, check-sources, and slot-sources (one global id
                  per slot) or default-source (every slot);
                  arrays "adapter.<id>": each global adapter the node's slots start from
    TrainReply    arrays "adapter.slot<i>": the trained adapter of slot i (no task label);
                  metrics "metrics": num-examples, slot-examples, train-loss,
                  [source-swaps, source-check-llr]; [arrays "fingerprints": "slot<i>": (H,)];
                  [arrays "label_fingerprints": "slot<i>": (C, H)];
                  [config "sources": slot-sources, the global each slot started from];
                  [config "truth": slot-tasks, each slot's true task, for metrics only]
    EvaluateReply metrics "metrics": correct.<task>, total.<task>, loss.<task>, num-examples
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedspecialists.protocol.records import (
    ADAPTER_PREFIX,
    FINGERPRINT_RECORD,
    LABEL_FINGERPRINT_RECORD,
    SOURCES_RECORD,
    adapter_names,
)
from fedspecialists.protocol.values import (
    ProtocolError,
    instruction_config,
    number,
    optional_count,
    optional_int,
    string_list,
)

CONFIG, METRICS, TRUTH = "config", "metrics", "truth"
LOCAL = "local"  # slot source meaning "the adapter the client kept itself" (local only)
_INSTRUCTION_KEYS = (
    "server-round",
    "keep-local",
    "send-fingerprint",
    "send-label-fingerprint",
    "check-sources",
    "slot-sources",
    "default-source",
)


def slot_name(i: int) -> str:
    """The name of task slot ``i`` in records (``slot<i>``)."""
    return f"slot{i}"


@dataclass
class Instruction:
    """Server -> node: where each task slot starts from, and what to send back.

    ``slot_sources`` names one global id (or ``local``) per slot of a node the server has
    heard from; a new node's slots all start from ``default_source``. ``globals`` holds the
    adapters those ids name. ``check_sources`` is the source check's evidence threshold in nats
    (0 = off); ``extra`` carries the strategy's config record through unchanged.
    """

    server_round: int
    keep_local: bool = False
    send_fingerprint: bool = False
    send_label_fingerprint: bool = False
    check_sources: float = 0.0
    slot_sources: list[str] | None = None
    default_source: str = "v0"
    globals: dict[str, ArrayRecord] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> RecordDict:
        config = ConfigRecord(dict(self.extra))
        config["server-round"] = self.server_round
        config["keep-local"] = self.keep_local
        config["send-fingerprint"] = self.send_fingerprint
        config["send-label-fingerprint"] = self.send_label_fingerprint
        config["check-sources"] = float(self.check_sources)
        if self.slot_sources is None:
            config["default-source"] = self.default_source
        else:
            config["slot-sources"] = list(self.slot_sources)
        content = RecordDict()
        for gid, record in self.globals.items():
            content.array_records[f"{ADAPTER_PREFIX}{gid}"] = record
        content.config_records[CONFIG] = config
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> Instruction:
        config = instruction_config(content, CONFIG)
        sources = None
        if "slot-sources" in config:
            sources = [str(s) for s in string_list(config, "slot-sources")]
        globals_ = {
            g: content.array_records[f"{ADAPTER_PREFIX}{g}"] for g in adapter_names(content)
        }
        return cls(
            server_round=int(number(config, "server-round")),
            keep_local=bool(config.get("keep-local", False)),
            send_fingerprint=bool(config.get("send-fingerprint", False)),
            send_label_fingerprint=bool(config.get("send-label-fingerprint", False)),
            check_sources=number(config, "check-sources") if "check-sources" in config else 0.0,
            slot_sources=sources,
            default_source=str(config.get("default-source", "v0")),
            globals=globals_,
            extra={k: v for k, v in config.items() if k not in _INSTRUCTION_KEYS},
        )

    def sources(self, num_slots: int) -> list[str]:
        """The source of each of ``num_slots`` slots (a global id, or ``local``)."""
        if self.slot_sources is None:
            return [self.default_source] * num_slots
        if len(self.slot_sources) != num_slots:
            raise ProtocolError(
                f"server sent {len(self.slot_sources)} slot sources for {num_slots} slots"
            )
        return list(self.slot_sources)

    def global_adapter(self, gid: str) -> ArrayRecord:
        """The global adapter ``gid`` the server sent."""
        if gid not in self.globals:
            raise ProtocolError(f"the server sent no global adapter '{gid}'")
        return self.globals[gid]


@dataclass
class TrainReply:
    """Node -> server after training: one adapter per task slot, without task labels.

    ``slot_sources`` (the source check's outcome) says which received global each slot
    started from; ``slot_tasks`` is the evaluation-only side channel of true tasks.
    """

    adapters: list[ArrayRecord]
    slot_examples: list[int]
    train_loss: float | None = None
    fingerprints: ArrayRecord | None = None
    label_fingerprints: ArrayRecord | None = None
    slot_sources: list[str] | None = None
    source_swaps: int | None = None
    source_check_llr: float | None = None
    slot_tasks: list[str] | None = None

    def to_record(self) -> RecordDict:
        content = RecordDict()
        for i, adapter in enumerate(self.adapters):
            content.array_records[f"{ADAPTER_PREFIX}{slot_name(i)}"] = adapter
        if self.fingerprints is not None:
            content.array_records[FINGERPRINT_RECORD] = self.fingerprints
        if self.label_fingerprints is not None:
            content.array_records[LABEL_FINGERPRINT_RECORD] = self.label_fingerprints
        metrics: dict[str, Any] = {
            "num-examples": sum(self.slot_examples),
            "slot-examples": list(self.slot_examples),
            "train-loss": self.train_loss if self.train_loss is not None else 0.0,
        }
        if self.slot_sources is not None:
            content.config_records[SOURCES_RECORD] = ConfigRecord(
                {"slot-sources": list(self.slot_sources)}
            )
            metrics["source-swaps"] = self.source_swaps or 0
            metrics["source-check-llr"] = self.source_check_llr or 0.0
        content.metric_records[METRICS] = MetricRecord(metrics)
        if self.slot_tasks is not None:
            content.config_records[TRUTH] = ConfigRecord({"slot-tasks": list(self.slot_tasks)})
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> TrainReply:
        """Read a reply: one adapter per entry of ``slot-examples`` (non-negative ints)."""
        metrics = content.metric_records.get(METRICS)
        if metrics is None or "slot-examples" not in metrics:
            raise ProtocolError("no 'metrics' record with 'slot-examples'")
        examples = metrics["slot-examples"]
        if not isinstance(examples, list) or any(not isinstance(n, int) or n < 0 for n in examples):
            raise ProtocolError("'slot-examples' must be a list of non-negative ints")
        slot_examples = [int(n) for n in examples]
        expected = [slot_name(i) for i in range(len(slot_examples))]
        names = adapter_names(content)
        if names != sorted(expected):
            raise ProtocolError(f"adapters {names} do not match {len(expected)} slots")
        sources = content.config_records.get(SOURCES_RECORD)
        truth = content.config_records.get(TRUTH)
        return cls(
            adapters=[content.array_records[f"{ADAPTER_PREFIX}{n}"] for n in expected],
            slot_examples=slot_examples,
            train_loss=optional_count(metrics, "train-loss") if "train-loss" in metrics else None,
            source_swaps=optional_int(metrics, "source-swaps"),
            source_check_llr=optional_count(metrics, "source-check-llr"),
            fingerprints=content.array_records.get(FINGERPRINT_RECORD),
            label_fingerprints=content.array_records.get(LABEL_FINGERPRINT_RECORD),
            slot_sources=None if sources is None else _slot_sources(sources),
            slot_tasks=None
            if truth is None or "slot-tasks" not in truth
            else [str(t) for t in string_list(truth, "slot-tasks")],
        )


@dataclass
class EvaluateReply:
    """Node -> server after evaluation: per task, correct predictions, examples and mean loss."""

    correct: dict[str, float]
    total: dict[str, float]
    loss: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> RecordDict:
        metrics: dict[str, Any] = {}
        for task in self.total:
            metrics[f"correct.{task}"] = self.correct[task]
            metrics[f"total.{task}"] = self.total[task]
            if task in self.loss:
                metrics[f"loss.{task}"] = self.loss[task]
        metrics["num-examples"] = int(sum(self.total.values()))
        return RecordDict({METRICS: MetricRecord(metrics)})

    @classmethod
    def from_record(cls, content: RecordDict) -> EvaluateReply:
        metrics = content.metric_records.get(METRICS)
        if metrics is None:
            raise ProtocolError("no 'metrics' record")
        out = cls({}, {})
        for key in metrics:
            kind, _, task = key.partition(".")
            if kind in ("correct", "total", "loss") and task:
                getattr(out, kind)[task] = number(metrics, key)
        return out


def _slot_sources(record: ConfigRecord) -> list[str]:
    value = record.get("slot-sources")
    if not isinstance(value, list):
        raise ProtocolError(f"'{SOURCES_RECORD}' must hold a 'slot-sources' list")
    return [str(s) for s in value]
