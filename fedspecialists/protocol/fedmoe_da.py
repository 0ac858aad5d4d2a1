"""FedMoE-DA's messages: what the server sends a node and what the node replies, as dataclasses.

Every record name and key of the method lives here; the strategy, the ClientApp and the tests
write and read messages only through these classes. Reading a message that breaks the protocol
raises :class:`ProtocolError` with the reason (the strategy logs it and rejects the reply).

Content of each message (record kind, name: keys)::

    Instruction   config "config": server-round, share, exchange, [peer-root], [run-key],
                  [grant-key, grant],
                  [plan.<k>.ids / .weights / .hashes / .addresses per expert k to mix];
                  arrays "shared": the server's aggregate of the shared parts (if any)
    TrainReply    metrics "metrics": num-examples, train-loss, aux-loss, peer-bytes,
                  peer-fetches, peer-failures, [peer-reused, domain-examples,
                  after-training-correct, after-training-total];
                  arrays "shared" (trained shared parts), "proxies" ("gate": (K, d));
                  config "experts": hashes (K SHA-256 hex digests), address
    EvaluateReply metrics "metrics": personal-correct, personal-total, global-correct,
                  global-total, domain-correct, domain-total, num-examples, [routing]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedspecialists.protocol.values import (
    ProtocolError,
    count,
    instruction_config,
    number,
    optional_count,
    optional_counts,
    optional_int,
    optional_str,
    string_list,
)

CONFIG, METRICS, SHARED, PROXIES, EXPERTS = "config", "metrics", "shared", "proxies", "experts"
GATE = "gate"  # the proxies record's one array: each expert's gate row, (K, d)
PLAN_PARTS = ("ids", "weights", "hashes", "addresses")  # plan.<k>.<part>: one list each
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Source:
    """One source expert of a sync plan: its id (``"<client id>/<k>"``), weight, hash and owner."""

    expert_id: str
    weight: float
    sha256: str
    address: str


@dataclass
class Instruction:
    """Server -> node, for a training or an evaluation round.

    ``plans`` maps each of the node's experts ``k`` to mix to its sources (Eq. 11); empty in a
    round without mixing. ``grant_key`` and ``grant`` (the server's public key and a signed
    per-round fetch grant) come with expert exchange. ``run_key`` names the run the node's
    personal files belong to (the same after a resume; ``None``: the Flower run id).
    """

    server_round: int
    share: list[str]
    exchange: bool
    peer_root: str | None = None
    grant_key: str | None = None
    grant: str | None = None
    plans: dict[int, list[Source]] = field(default_factory=dict)
    shared: ArrayRecord | None = None
    run_key: str | None = None

    def to_record(self) -> RecordDict:
        config = ConfigRecord(
            {
                "server-round": self.server_round,
                "share": list(self.share),
                "exchange": self.exchange,
            }
        )
        if self.peer_root is not None:
            config["peer-root"] = self.peer_root
        if self.run_key is not None:
            config["run-key"] = self.run_key
        if self.grant_key is not None:
            config["grant-key"] = self.grant_key
            config["grant"] = self.grant or ""
        for k, sources in self.plans.items():
            config[f"plan.{k}.ids"] = [s.expert_id for s in sources]
            config[f"plan.{k}.weights"] = [s.weight for s in sources]
            config[f"plan.{k}.hashes"] = [s.sha256 for s in sources]
            config[f"plan.{k}.addresses"] = [s.address for s in sources]
        content = RecordDict({CONFIG: config})
        if self.shared is not None:
            content.array_records[SHARED] = self.shared
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> Instruction:
        config = instruction_config(content, CONFIG)
        grant_key = config.get("grant-key")
        return cls(
            server_round=int(number(config, "server-round")),
            share=[str(p) for p in string_list(config, "share")],
            exchange=bool(config.get("exchange", False)),
            peer_root=optional_str(config, "peer-root"),
            grant_key=None if grant_key is None else str(grant_key),
            grant=str(config.get("grant", "")) or None,
            plans=_plans(config),
            shared=content.array_records.get(SHARED),
            run_key=optional_str(config, "run-key"),
        )

    def planned_hashes(self) -> set[str]:
        """Every source hash the plans name (what a changed-only cache must keep)."""
        return {s.sha256 for sources in self.plans.values() for s in sources}


@dataclass
class TrainReply:
    """Node -> server after training: counts, losses, peer traffic, the trained shared parts and,
    with expert exchange, the experts' proxies, content hashes and the node's peer address."""

    num_examples: int
    train_loss: float
    aux_loss: float
    peer_bytes: int
    peer_fetches: int
    peer_failures: int
    peer_reused: int = 0
    domain_examples: list[int] | None = None
    after_training_correct: int | None = None
    after_training_total: int | None = None
    shared: ArrayRecord | None = None
    proxies: ArrayRecord | None = None
    hashes: list[str] | None = None
    address: str | None = None

    def to_record(self) -> RecordDict:
        metrics: dict[str, Any] = {
            "num-examples": self.num_examples,
            "train-loss": self.train_loss,
            "aux-loss": self.aux_loss,
            "peer-bytes": self.peer_bytes,
            "peer-fetches": self.peer_fetches,
            "peer-failures": self.peer_failures,
            "peer-reused": self.peer_reused,
        }
        if self.domain_examples is not None:
            metrics["domain-examples"] = list(self.domain_examples)
        if self.after_training_total is not None:
            metrics["after-training-correct"] = self.after_training_correct or 0
            metrics["after-training-total"] = self.after_training_total
        content = RecordDict()
        if self.shared is not None:
            content.array_records[SHARED] = self.shared
        if self.proxies is not None:
            content.array_records[PROXIES] = self.proxies
        if self.hashes is not None:
            content.config_records[EXPERTS] = ConfigRecord(
                {"hashes": list(self.hashes), "address": self.address or ""}
            )
        content.metric_records[METRICS] = MetricRecord(metrics)
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> TrainReply:
        """Read a reply; required counts must be finite and >= 0, optional ones are kept only
        when they are; expert hashes must be SHA-256 hex digests and the address non-empty."""
        metrics = content.metric_records.get(METRICS)
        if metrics is None:
            raise ProtocolError("no 'metrics' record")
        required = {
            key: count(metrics, key)
            for key in ("num-examples", "train-loss", "peer-bytes", "peer-fetches", "peer-failures")
        }
        if required["num-examples"] <= 0:
            raise ProtocolError("no training examples")
        hashes, address = _experts(content.config_records.get(EXPERTS))
        return cls(
            num_examples=int(required["num-examples"]),
            train_loss=float(required["train-loss"]),
            aux_loss=float(optional_count(metrics, "aux-loss") or 0.0),
            peer_bytes=int(required["peer-bytes"]),
            peer_fetches=int(required["peer-fetches"]),
            peer_failures=int(required["peer-failures"]),
            peer_reused=int(optional_count(metrics, "peer-reused") or 0),
            domain_examples=optional_counts(metrics, "domain-examples"),
            after_training_correct=optional_int(metrics, "after-training-correct"),
            after_training_total=optional_int(metrics, "after-training-total"),
            shared=content.array_records.get(SHARED),
            proxies=content.array_records.get(PROXIES),
            hashes=hashes,
            address=address,
        )

    def gate_proxies(self) -> np.ndarray | None:
        """The experts' proxies ``(K, d)``, or None when the reply carries none."""
        if self.proxies is None or GATE not in self.proxies:
            return None
        return self.proxies[GATE].numpy()


@dataclass
class EvaluateReply:
    """Node -> server after evaluation: personalised and global test counts, per domain, and
    the routing counts (flattened (domains x K)) of a mixture-of-experts model."""

    personal_correct: int
    personal_total: int
    global_correct: int
    global_total: int
    domain_correct: list[int]
    domain_total: list[int]
    routing: list[int] | None = None

    def to_record(self) -> RecordDict:
        metrics: dict[str, Any] = {
            "personal-correct": self.personal_correct,
            "personal-total": self.personal_total,
            "global-correct": self.global_correct,
            "global-total": self.global_total,
            "domain-correct": list(self.domain_correct),
            "domain-total": list(self.domain_total),
            "num-examples": self.personal_total,
        }
        if self.routing is not None:
            metrics["routing"] = list(self.routing)
        return RecordDict({METRICS: MetricRecord(metrics)})

    @classmethod
    def from_record(cls, content: RecordDict) -> EvaluateReply:
        metrics = content.metric_records.get(METRICS)
        if metrics is None or not (optional_count(metrics, "personal-total") or 0) > 0:
            raise ProtocolError("no personalised test results")
        domain_correct = optional_counts(metrics, "domain-correct")
        domain_total = optional_counts(metrics, "domain-total")
        if domain_correct is None or domain_total is None:
            raise ProtocolError("no per-domain test counts")
        return cls(
            personal_correct=int(count(metrics, "personal-correct")),
            personal_total=int(count(metrics, "personal-total")),
            global_correct=int(optional_count(metrics, "global-correct") or 0),
            global_total=int(optional_count(metrics, "global-total") or 0),
            domain_correct=domain_correct,
            domain_total=domain_total,
            routing=optional_counts(metrics, "routing"),
        )


def _plans(config: ConfigRecord) -> dict[int, list[Source]]:
    plans: dict[int, list[Source]] = {}
    for key in config:
        match = re.fullmatch(r"plan\.(\d+)\.ids", key)
        if match is None or not config[key]:
            continue
        k = int(match.group(1))
        parts = [
            string_list(config, f"plan.{k}.{part}")
            for part in ("ids", "weights", "hashes", "addresses")
        ]
        if len({len(p) for p in parts}) != 1:
            raise ProtocolError(f"plan {k}: ids, weights, hashes and addresses differ in length")
        plans[k] = [
            Source(str(i), float(w), str(h), str(a)) for i, w, h, a in zip(*parts, strict=True)
        ]
    return dict(sorted(plans.items()))


def _experts(record: ConfigRecord | None) -> tuple[list[str] | None, str | None]:
    if record is None:
        return None, None
    hashes = [str(h) for h in string_list(record, "hashes")]
    if not all(_SHA256.fullmatch(h) for h in hashes):
        raise ProtocolError("expert hashes must be SHA-256 hex digests")
    address = record.get("address")
    if not isinstance(address, str) or not address:
        raise ProtocolError("no peer address")
    return hashes, address
