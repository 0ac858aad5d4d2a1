"""Faults injected on purpose (``faults.*``), as a Flower ClientApp mod: what a run survives.

Each training round, ``round(faults.fraction * federation.num_clients)`` clients, drawn by
``faults.seed`` and the round among the client ids ``0..num_clients-1``, are faulty:

* ``crash``: the ClientApp raises (Flower returns an error reply);
* ``hang``: it sleeps past ``federation.reply_timeout_s`` (no reply reaches the server in time),
  then raises;
* ``nan`` / ``inf``: the first value of each trained update is NaN / +Inf;
* ``shape``: the first tensor of each trained update loses its last row;
* ``huge_norm``: each trained update is multiplied by 1e6;
* ``sign_flip``: each update is reversed, ``x' = r - (x - r)`` against what it started from;
* ``scale``: each update is scaled, ``x' = r + faults.scale * (x - r)``;
* ``other_task`` (FL-TAC): slot ``i`` sends the adapter trained for slot ``i + 1``'s task
  (a client with one task cannot, and stays honest);
* ``absent``: no fault here; the server leaves the drawn clients out of training
  (``fedspecialists.faults``), the clean reference with a crash run's exact participation.

Which records are the trained updates, and what each started from, the method's client
handlers say (``update_pairs(instruction, reply)``). A faulty reply names its fault in a
``fault`` config record, for the metrics only (like ``report_true_tasks``); the server never
uses it to decide anything. Evaluation messages are left alone, unless ``faults.evaluate`` lets
``crash`` and ``hang`` strike them too (the same clients as that round's training).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from client_app.node import client_id_of, config_for
from fedspecialists import methods
from fedspecialists.config import ExperimentConfig
from fedspecialists.faults import faulty_clients
from fedspecialists.protocol.records import FAULT_RECORD
from fedspecialists.protocol.values import instruction_config, number

HANG_MARGIN_S = 5.0  # a hung client sleeps this long past the server's reply timeout
HUGE = 1.0e6


def poisoned(
    arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None, kind: str, scale: float
) -> dict[str, np.ndarray]:
    """One trained update turned into ``kind`` (``reference``: what it started from; without
    one the update is taken against zero)."""
    out = {k: np.array(v, copy=True) for k, v in arrays.items()}
    first = next(iter(out))
    if kind in ("nan", "inf"):
        for value in out.values():
            value.flat[0] = np.nan if kind == "nan" else np.inf
    elif kind == "shape":
        out[first] = out[first][:-1] if out[first].ndim else out[first].reshape(1)[:0]
    elif kind in ("huge_norm", "sign_flip", "scale"):
        factor = {"huge_norm": HUGE, "sign_flip": -1.0, "scale": scale}[kind]
        for key, value in out.items():
            ref = np.zeros_like(value) if reference is None else np.asarray(reference[key])
            out[key] = (ref + factor * (value - ref)).astype(value.dtype)
    return out


def _as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _as_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def _attack(msg: Message, reply: Message, cfg: ExperimentConfig) -> bool:
    """Poison ``reply``'s trained updates in place; whether anything was changed."""
    handlers = methods.get(cfg.method.name).client_handlers()
    pairs = handlers.update_pairs(msg.content, reply.content)
    records = reply.content.array_records
    if cfg.faults.kind == "other_task":
        if len(pairs) < 2:
            return False
        trained = [records[name] for name, _ in pairs]
        for i, (name, _) in enumerate(pairs):
            records[name] = trained[(i + 1) % len(trained)]
        return True
    for name, reference in pairs:
        ref = None if reference is None else _as_numpy(reference)
        records[name] = _as_record(
            poisoned(_as_numpy(records[name]), ref, cfg.faults.kind, cfg.faults.scale)
        )
    return bool(pairs)


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The ClientApp mod: pass the message on, unless this client is faulty this round."""
    cfg = config_for(str(context.run_config.get("overrides", "")))
    faults = cfg.faults
    training = msg.metadata.message_type == MessageType.TRAIN
    evaluating = msg.metadata.message_type == MessageType.EVALUATE
    strikes = training or (evaluating and faults.evaluate and faults.kind in ("crash", "hang"))
    if faults.kind in ("none", "absent") or faults.fraction <= 0 or not strikes:
        return call_next(msg, context)
    server_round = int(number(instruction_config(msg.content), "server-round"))
    chosen = faulty_clients(faults.seed, server_round, cfg.federation.num_clients, faults.fraction)
    if client_id_of(context) not in chosen:
        return call_next(msg, context)
    if faults.kind == "crash":
        raise RuntimeError(f"injected fault: crash (round {server_round})")
    if faults.kind == "hang":
        time.sleep(cfg.federation.reply_timeout_s + HANG_MARGIN_S)
        raise RuntimeError(f"injected fault: hang (round {server_round})")
    reply = call_next(msg, context)
    if not reply.has_error() and _attack(msg, reply, cfg):
        reply.content.config_records[FAULT_RECORD] = ConfigRecord({"kind": faults.kind})
    return reply
