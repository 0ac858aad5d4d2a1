"""Round r's evaluation carried by round r + 1's training message (``federation.fold_evaluation``).

Both methods' evaluation of round r uses exactly what round r + 1's training message brings
(FL-TAC: the globals each slot starts from; FedMoE-DA: the aggregated shared parts, beside the
personal parts kept after round r). So the server can ask, in the training message, for the
evaluation first; the node evaluates, then trains, and sends both in one reply. A deployment
then exchanges one message per node per round instead of two.

Content added to the messages::

    training message   config "evaluate-first": round (the round to evaluate)
    training reply     every record of the evaluation reply, its name prefixed "evaluation.";
                       or config "evaluation-error": reason (the evaluation raised)

Every method's instruction keeps its round in its config record ``config``, key
``server-round``: the evaluation request is the training message with that round.
"""

from __future__ import annotations

import copy

from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedspecialists.protocol.values import ProtocolError

EVALUATE_FIRST = "evaluate-first"
EVALUATION_PREFIX = "evaluation."
EVALUATION_ERROR = "evaluation-error"
INSTRUCTION_CONFIG, ROUND_KEY = "config", "server-round"


def ask_evaluation_first(content: RecordDict, evaluation_round: int) -> None:
    """Mark a training message's ``content``: evaluate round ``evaluation_round`` first."""
    content[EVALUATE_FIRST] = ConfigRecord({"round": int(evaluation_round)})


def split_request(content: RecordDict) -> tuple[RecordDict, RecordDict | None]:
    """A training message's content as (the training request, the evaluation request or
    ``None`` if none was asked for). Neither shares the marker; the evaluation request's
    instruction names the round to evaluate."""
    train = RecordDict({k: v for k, v in content.items() if k != EVALUATE_FIRST})
    marker = content.config_records.get(EVALUATE_FIRST)
    if marker is None:
        return train, None
    evaluation_round = marker.get("round")
    instruction = content.config_records.get(INSTRUCTION_CONFIG)
    if not isinstance(evaluation_round, int) or instruction is None:
        raise ProtocolError("'evaluate-first' needs an int 'round' and a 'config' instruction")
    evaluation = RecordDict(dict(train))  # the same records, one config copied and changed
    config = ConfigRecord(dict(instruction))
    config[ROUND_KEY] = evaluation_round
    evaluation[INSTRUCTION_CONFIG] = config
    return train, evaluation


def attach_evaluation(reply: RecordDict, evaluation: RecordDict | str) -> None:
    """Add the evaluation's reply ``evaluation`` (or the reason it failed) to a training reply."""
    if isinstance(evaluation, str):
        reply[EVALUATION_ERROR] = ConfigRecord({"reason": evaluation})
        return
    for name, record in evaluation.items():
        reply[f"{EVALUATION_PREFIX}{name}"] = record


def detach_evaluation(reply: RecordDict) -> RecordDict | str | None:
    """Take the evaluation out of a training reply (which keeps only the training's records):
    the evaluation reply's content, the reason it failed, or ``None`` if it carries none."""
    names = [k for k in reply if k.startswith(EVALUATION_PREFIX)]
    error = reply.config_records.get(EVALUATION_ERROR)
    evaluation = RecordDict({k[len(EVALUATION_PREFIX) :]: reply[k] for k in names})
    for name in names:
        del reply[name]
    if error is not None:
        del reply[EVALUATION_ERROR]
        return str(error.get("reason", "unknown"))
    return evaluation if names else None


def as_type(
    message: Message,
    message_type: str,
    content: RecordDict | None = None,
    error: Error | None = None,
) -> Message:
    """A message with ``message``'s metadata (ids, nodes, run) but of ``message_type``,
    holding ``content`` or ``error``: one of the two messages a folded one stands for."""
    metadata = copy.copy(message.metadata)
    metadata.message_type = message_type
    # Flower's constructor takes a given metadata, though its typed overloads do not say so.
    return Message(content=content, error=error, metadata=metadata)  # type: ignore[call-overload]
