"""Round r's evaluation inside round r + 1's training message, as a Flower ClientApp mod
(``federation.fold_evaluation``; see :mod:`fedspecialists.protocol.fold`).

A training message that asks for the evaluation first is handled as the two messages it stands
for: the evaluation message the server would have sent for round r goes to the ClientApp's
evaluation handler (the same one, so the metrics mean what they always meant), then the
training message goes on through the rest of the ClientApp. The two replies travel back as one.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.logger import log

from fedspecialists.protocol.fold import as_type, attach_evaluation, split_request


def fold_evaluation(evaluate: ClientAppCallable) -> Mod:
    """The mod, evaluating with ``evaluate``, the ClientApp's evaluation handler (a mod's
    ``call_next`` reaches only the handler of the message's own type: training here)."""

    def fold_evaluation_mod(
        msg: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        """Evaluate first where the training message asks for it, then train; one reply."""
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        train_content, evaluation_content = split_request(msg.content)
        if evaluation_content is None:
            return call_next(msg, context)
        request = as_type(msg, MessageType.EVALUATE, content=evaluation_content)
        evaluation: RecordDict | str
        try:  # a failed evaluation is reported in the reply; the training still runs
            answer = evaluate(request, context)
            evaluation = (
                (answer.error.reason or "unknown") if answer.has_error() else answer.content
            )
        except Exception as exc:  # whatever the handler raised is said to the server
            log(WARNING, "the evaluation asked for before training failed: %s", exc)
            evaluation = f"{type(exc).__name__}: {exc}"
        msg.content = train_content
        reply = call_next(msg, context)
        if not reply.has_error():
            attach_evaluation(reply.content, evaluation)
        return reply

    return fold_evaluation_mod
