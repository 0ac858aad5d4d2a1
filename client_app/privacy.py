"""Local differential privacy (``privacy.*``) with Flower's own ``LocalDpMod``, per update.

Flower's ``LocalDpMod`` clips a client's update (against the parameters the server sent) to
``clipping_norm`` and adds Gaussian noise of std ``sensitivity * sqrt(2 ln(1.25 / delta)) /
epsilon``, but only for messages that carry a single ArrayRecord each way. Ours carry one per
task slot (FL-TAC) or the shared parts beside the gate proxies (FedMoE-DA), so this mod hands
``LocalDpMod`` one trained update at a time, with the record it started from, exactly as a
one-record message pair; the method's client handlers name the pairs (``update_pairs``).
An update without a reference (a local-only adapter, which never leaves the client) is left
alone. The noise is drawn from a generator seeded by the run's seed, the round and the
client, so that a run with DP is as reproducible as one without.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.mod import LocalDpMod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace

from client_app.node import client_id_of, config_for
from client_app.training import round_seed
from fedspecialists import methods
from fedspecialists.config import PrivacySettings
from fedspecialists.protocol.values import instruction_config, number

RECORD = "arrays"  # the one record of the message pair handed to LocalDpMod


def _mod_std(mod: LocalDpMod) -> float:
    """The std of ``mod``'s noise (:meth:`PrivacySettings.noise_std`, from the mod's own)."""
    settings = PrivacySettings(True, mod.clipping_norm, mod.sensitivity, mod.epsilon, mod.delta)
    return settings.noise_std()


def local_dp(
    mod: LocalDpMod, reference: ArrayRecord, trained: ArrayRecord, received: Message
) -> ArrayRecord:
    """``trained`` clipped against ``reference`` and noised by Flower's ``mod``.

    The message pair handed to ``mod`` is built as replies to the message the client
    ``received`` (so it keeps its type, train): a new instruction message would need Flower's
    task identity, which a simulated ClientApp does not have (Flower 1.42 raises
    "TaskIdentity.run_id is not set"), and every DP reply of a simulation failed that way.
    An update of norm 0 (a slot with no examples sends back what it received) makes Flower's
    clipping divide by zero; clipping is a no-op on it, so it only gets the mod's noise, from
    Flower's own noise function.
    """
    if all(np.array_equal(trained[k].numpy(), reference[k].numpy()) for k in trained):
        arrays = [trained[k].numpy().copy() for k in trained]
        add_gaussian_noise_inplace(arrays, _mod_std(mod))
        return ArrayRecord({k: Array(v) for k, v in zip(trained.keys(), arrays, strict=True)})
    sent = Message(RecordDict({RECORD: reference}), reply_to=received)

    def trained_reply(msg: Message, _context: Context) -> Message:
        return Message(RecordDict({RECORD: trained}), reply_to=msg)

    out = mod(sent, Context(0, 0, {}, RecordDict(), {}), trained_reply)
    return out.content.array_records[RECORD]


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The ClientApp mod: every trained update of a training reply through ``LocalDpMod``."""
    cfg = config_for(str(context.run_config.get("overrides", "")))
    reply = call_next(msg, context)
    training = msg.metadata.message_type == MessageType.TRAIN
    if not cfg.privacy.local_dp or not training or reply.has_error():
        return reply
    dp = cfg.privacy
    mod = LocalDpMod(dp.clipping_norm, dp.sensitivity, dp.epsilon, dp.delta)
    server_round = int(number(instruction_config(msg.content), "server-round"))
    state = np.random.get_state()
    np.random.seed(round_seed(cfg.seed, server_round, client_id_of(context)) % 2**32)
    try:
        handlers = methods.get(cfg.method.name).client_handlers()
        records = reply.content.array_records
        for name, reference in handlers.update_pairs(msg.content, reply.content):
            if reference is not None:
                records[name] = local_dp(mod, reference, records[name], msg)
    finally:
        np.random.set_state(state)  # LocalDpMod draws from numpy's global generator
    return reply
