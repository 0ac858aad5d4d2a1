"""The typed round record: one round of a run, written as one line of ``metrics.jsonl``.

:class:`RoundRecord` holds the entries every method fills (replies, aggregation, evaluation
summary, time and bytes); a method's own entries are the fields of its subclass, next to its
strategy (``FLTACRoundRecord`` in :mod:`strategies.fltac`, ``FedMoEDARoundRecord`` in
:mod:`strategies.fedmoe_da`). A method registered from outside the project that needs more keys
puts them in ``extra``. The JSON form is the public interface users' scripts read: a field left
at ``None`` is absent from its line, ``extra`` is merged in, and :meth:`RoundRecord.from_json`
reads a line back (a checkpoint's history), keeping keys it does not know in ``extra``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="RoundRecord")


@dataclass
class RoundRecord:
    """What every method records of a round (``None``: the round has no value for it).

    Attributes
    ----------
    round : int
        The server round.
    replies_ok, replies_failed, replies_rejected : int | None
        Training replies accepted, failed on the client (Flower error), refused by the server.
    replies_missing : int | None
        Sampled nodes whose training reply never came (timed out, or gone).
    rejected_reasons : list[str] | None
        Why each refused reply was refused (logged as well).
    rejected_injected : int | None
        Of the refused replies, how many said they carried an injected fault (``faults.*``;
        metrics only, set in rounds with such replies).
    failed_reasons : list[str] | None
        What each failed reply's error said (its last 500 characters; logged in full).
    faults_injected : dict[str, int] | None
        Replies that said they carried an injected fault, by kind (``faults.*``).
    clients_absent : int | None
        Clients left out of training on purpose (``faults.kind=absent``).
    updates_dropped : int | None
        Accepted updates left out of their aggregate as opposed to their group's median update
        (``robust.drop_opposed_updates``; FL-TAC counts adapters, FedMoE-DA backbones).
    dropped_reasons : list[str] | None
        Whose update each was, its group and its cosine to the group's median (logged as well).
    dropped_injected : int | None
        Of those, how many came from replies that said they carried an injected fault
        (``faults.*``; metrics only, set in rounds with such replies).
    updates_clipped : int | None
        Accepted updates whose norm the configured clipping cut (``robust.clip_norm``,
        ``clip_to_median_norm``, ``clip_outlier_norms``, ``clip_outlier_norms_for_steps``; set
        when clipping is on).
    clipped_reasons : list[str] | None
        Whose update each was, its group and its norm before and after (logged as well).
    clipped_injected : int | None
        Of those, how many came from replies that said they carried an injected fault
        (``faults.*``; metrics only, set in rounds with such replies).
    train_loss : float | None
        Mean training loss over the accepted replies, weighted by examples.
    aggregated : bool | None
        False when the round's aggregation was skipped (too few valid replies).
    aggregate_s : float | None
        The server's own aggregation time for the round (no waiting), seconds.
    evaluated : bool | None
        False when the round sent no evaluation message at all.
    evaluated_in_round : int | None
        Set when the round's evaluation came with the next round's training replies.
    mean_accuracy : float | None
        The method's headline accuracy, a mean over tasks or clients.
    round_time_s, wall_time_s : float | None
        The round's time; the run's time at its end.
    bytes : dict[str, Any] | None
        The round's message bytes by phase and direction, and the cumulative ones.
    extra : dict[str, Any]
        Entries of a method that has no record class of its own.
    """

    round: int
    replies_ok: int | None = None
    replies_failed: int | None = None
    replies_rejected: int | None = None
    replies_missing: int | None = None
    rejected_reasons: list[str] | None = None
    rejected_injected: int | None = None
    failed_reasons: list[str] | None = None
    faults_injected: dict[str, int] | None = None
    clients_absent: int | None = None
    updates_dropped: int | None = None
    dropped_reasons: list[str] | None = None
    dropped_injected: int | None = None
    updates_clipped: int | None = None
    clipped_reasons: list[str] | None = None
    clipped_injected: int | None = None
    train_loss: float | None = None
    aggregated: bool | None = None
    aggregate_s: float | None = None
    evaluated: bool | None = None
    evaluated_in_round: int | None = None
    mean_accuracy: float | None = None
    round_time_s: float | None = None
    wall_time_s: float | None = None
    bytes: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # Entries the run folder files apart (aggregation.jsonl, embeddings.jsonl): a round's copy
    # grows with the clients heard from, so the history (memory, checkpoint) does not keep it.
    FILED_APART: ClassVar[tuple[str, ...]] = ("aggregation", "embedding")

    def drop_filed_apart(self) -> None:
        """Forget :attr:`FILED_APART`'s entries once they are written (``None``: absent)."""
        for f in fields(self):
            if f.name in self.FILED_APART:
                setattr(self, f.name, None)
        for name in self.FILED_APART:
            self.extra.pop(name, None)

    def to_json(self) -> dict[str, Any]:
        """The record as one line of ``metrics.jsonl`` (fields left at ``None`` are absent)."""
        entries = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in entries.items() if v is not None}, **self.extra}

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any]) -> R:
        """A record from :meth:`to_json`'s output; unknown keys go to ``extra``."""
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})
