"""ClientApp handlers of the adapter methods: one LoRA adapter per local task (FL-TAC, oracle,
local only) or one shared adapter (FedIT), trained on the node's own share of every task.

ClientApps are recreated for every message; what survives lives in the process (the base model,
the encoded data: see ``fedspecialists.models.lora``) or in ``context.state`` (the local-only
baseline's adapters).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common.logger import log

from client_app.fltac_data import NodeExamples, TaskExamples, node_examples
from client_app.fltac_training import (
    Encoded,
    concat,
    evaluate_adapter,
    example_losses,
    input_representations,
    label_fingerprint,
    mean_representation,
    train_adapter,
)
from client_app.node import config_as, data_dir_of, device_of, partition_of, run_config
from client_app.training import round_seed
from fedspecialists import methods
from fedspecialists.config import AdapterRunConfig
from fedspecialists.models.lora import (
    AdapterModel,
    build_preprocessor,
    get_adapter_model,
    suite_kind,
)
from fedspecialists.protocol.fltac import (
    LOCAL,
    EvaluateReply,
    Instruction,
    TrainReply,
    slot_name,
)
from fedspecialists.protocol.records import (
    ADAPTER_PREFIX,
    record_to_state,
    state_to_record,
)


@dataclass
class Setup:
    """What one message's handler needs: the composed config, this node's slots and the model."""

    overrides: str
    cfg: AdapterRunConfig
    partition: tuple[int, int]  # (partition id, number of partitions)
    slots: list[Slot]
    adapters: AdapterModel
    sources: list[str]  # the global id (or "local") each slot starts from
    instruction: Instruction  # what the server sent

    def training_data(self, slot: Slot) -> Encoded:
        """Every training example of the slot's tasks."""
        return concat([t.train for t in slot.tasks])

    def fingerprint(self, slot: Slot) -> np.ndarray:
        """The slot's input fingerprint ``(H,)`` (:func:`input_fingerprint`)."""
        return self.fingerprints(slot)[0]

    def label_fingerprint(self, slot: Slot) -> np.ndarray:
        """The slot's label fingerprint ``(C, H)`` (:func:`label_fingerprint`)."""
        return self.fingerprints(slot)[1]

    def fingerprints(self, slot: Slot) -> tuple[np.ndarray, np.ndarray]:
        """The slot's input and label fingerprints, from one pass of the frozen model over its
        training inputs, computed once per process (inputs and labels are fixed)."""
        cache = _run_cache(self.overrides).fingerprints
        key = (*self.partition, slot.name)
        if key not in cache:
            enc = self.training_data(slot)
            reps = input_representations(
                self.adapters, enc, self.cfg.train.eval_batch_size, self.cfg.model.head_module
            )
            cache[key] = (mean_representation(reps), _slot_label_fingerprint(reps, enc, slot))
        return cache[key]


def _slot_label_fingerprint(reps: np.ndarray, enc: Encoded, slot: Slot) -> np.ndarray:
    """``(C, H)`` label fingerprint of a slot (C: its tasks' largest label count); one zero row
    where the labels are not classes (a causal LM's tokens): nothing to separate."""
    if enc.labels.ndim != 1:
        return np.zeros((1, reps.shape[1]), dtype=np.float32)
    count = max(task.num_labels for task in slot.tasks)
    return label_fingerprint(reps, enc.labels.numpy(), count)


@dataclass
class Slot:
    """One adapter of this client and the tasks it serves (one task, or all for FedIT)."""

    name: str
    tasks: list[TaskExamples]


@lru_cache(maxsize=4)
def _preprocessor(overrides: str) -> object:
    cfg = config_as(overrides, AdapterRunConfig)
    return build_preprocessor(cfg.model, suite_kind(cfg))


@dataclass
class RunCache:
    """What a process keeps of one run between messages: each node's encoded examples (also on
    the site's disk: :mod:`client_app.fltac_data`) and input fingerprints."""

    examples: dict[tuple[int, int], NodeExamples] = field(default_factory=dict)
    fingerprints: dict[tuple[int, int, str], tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )


@lru_cache(maxsize=4)  # a warm site serves run after run: keep the last few, not all
def _run_cache(overrides: str) -> RunCache:
    return RunCache()


def _examples(
    overrides: str, cfg: AdapterRunConfig, partition: tuple[int, int], data_dir: str | None
) -> NodeExamples:
    examples = _run_cache(overrides).examples
    if partition not in examples:
        examples[partition] = node_examples(
            cfg, partition, data_dir, lambda: _preprocessor(overrides)
        )
    return examples[partition]


def _setup(msg: Message, context: Context) -> Setup:
    """Compose the config, find this node's tasks and load each slot's starting adapter."""
    overrides, cfg = run_config(context, AdapterRunConfig)
    data_dir = data_dir_of(context, cfg)
    partition = partition_of(context, own_files=bool(data_dir))
    examples = _examples(overrides, cfg, partition, data_dir)
    mine, counts = examples.tasks, examples.suite_label_counts
    if methods.get(cfg.method.name).adapters == "shared":
        slots = [Slot("slot0", list(mine))] if mine else []
    else:
        slots = [Slot(f"slot{i}", [task]) for i, task in enumerate(mine)]
    adapters = get_adapter_model(cfg, max(counts), device_of(context, cfg))
    instruction = Instruction.from_record(msg.content)
    sources = _load_sources(instruction, context, slots, adapters)
    return Setup(overrides, cfg, partition, slots, adapters, sources, instruction)


def _load_sources(
    instruction: Instruction, context: Context, slots: list[Slot], adapters: AdapterModel
) -> list[str]:
    """Load every slot's starting adapter: the one the server named, or the locally kept one.

    Returns the source of every slot (a global id, or ``local``).
    """
    sources = instruction.sources(len(slots))
    for slot, source in zip(slots, sources, strict=True):
        if source == LOCAL:
            key = f"{ADAPTER_PREFIX}{slot.name}"
            if key not in context.state.array_records:  # context.state dies with the process
                raise RuntimeError(
                    f"slot {slot.name}: no locally kept adapter (a local-only run cannot be "
                    "resumed after its nodes restarted: their context.state is gone)"
                )
            record = context.state.array_records[key]
        else:
            record = instruction.global_adapter(source)
        adapters.load(slot.name, record_to_state(record))
    return sources


def check_sources(setup: Setup, min_llr: float) -> tuple[int, float]:
    """FL-TAC's client-side source check (see :func:`strategies.fltac.choose_sources`).

    Every global adapter the server sent is scored on every slot's training examples; where the
    evidence for a one-to-one reassignment reaches ``min_llr`` (nats), the slots are reloaded
    from the globals chosen and ``setup.sources`` is updated. Returns (slots changed, the
    log-likelihood ratio of the best change).
    """
    candidates = sorted({s for s in setup.sources if s not in ("local", "v0")})
    if len(candidates) < 2 or any(s not in candidates for s in setup.sources):
        return 0, 0.0
    holder = {source: slot.name for slot, source in zip(setup.slots, setup.sources, strict=True)}
    batch_size = setup.cfg.train.eval_batch_size
    losses = []
    for slot in setup.slots:
        enc = setup.training_data(slot)
        losses.append(
            np.stack(
                [example_losses(setup.adapters, holder[c], enc, batch_size) for c in candidates], 1
            )
        )
    from strategies.fltac import choose_sources  # the server's module: only when the check is on

    current = [candidates.index(s) for s in setup.sources]
    chosen, llr = choose_sources(losses, current, min_llr)
    changed = [i for i in range(len(chosen)) if chosen[i] != current[i]]
    for i in changed:
        record = setup.instruction.global_adapter(candidates[chosen[i]])
        setup.adapters.load(setup.slots[i].name, record_to_state(record))
        setup.sources[i] = candidates[chosen[i]]
    if changed:
        log(
            INFO,
            "partition %s: source check moved slots %s (log-likelihood ratio %.1f)",
            setup.partition[0],
            changed,
            llr,
        )
    return len(changed), llr


def train(msg: Message, context: Context) -> Message:
    """Train each local adapter on its own task data; reply with all adapters, no task labels."""
    started = time.perf_counter()
    setup = _setup(msg, context)
    cfg, partition, instruction = setup.cfg, setup.partition, setup.instruction
    min_llr = instruction.check_sources
    check = check_sources(setup, min_llr) if min_llr > 0 else None
    adapters: list[ArrayRecord] = []
    examples: list[int] = []
    weighted_loss = 0.0
    for i, slot in enumerate(setup.slots):
        enc = setup.training_data(slot)
        seed = round_seed(cfg.seed, instruction.server_round, partition[0], i)
        loss, _ = train_adapter(setup.adapters, slot.name, enc, cfg.train, seed)
        adapters.append(state_to_record(setup.adapters.state(slot.name)))
        if instruction.keep_local:
            context.state.array_records[f"{ADAPTER_PREFIX}{slot.name}"] = adapters[-1]
        examples.append(len(enc))
        weighted_loss += loss * len(enc)
    total = sum(examples)
    reply = TrainReply(adapters, examples, train_loss=weighted_loss / total if total else 0.0)
    if instruction.send_fingerprint:
        # FL-TAC's task evidence beside the adapters: what each slot's inputs look like.
        reply.fingerprints = state_to_record(
            {slot.name: setup.fingerprint(slot) for slot in setup.slots}
        )
    if instruction.send_label_fingerprint:
        # ... and what separates each slot's classes in those inputs.
        reply.label_fingerprints = state_to_record(
            {slot.name: setup.label_fingerprint(slot) for slot in setup.slots}
        )
    if check is not None:
        # Which received global each slot started from (a permutation of the server's plan).
        reply.slot_sources = list(setup.sources)
        reply.source_swaps, reply.source_check_llr = check
    if cfg.report_true_tasks:
        # Evaluation-only side channel (clustering agreement, oracle); never used to cluster.
        reply.slot_tasks = ["+".join(t.name for t in slot.tasks) for slot in setup.slots]
    log(
        INFO,
        "partition %s: trained %s adapter(s) on %s examples in %.1fs",
        partition[0],
        len(setup.slots),
        total,
        time.perf_counter() - started,
    )
    return Message(content=reply.to_record(), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the adapters this node would use now, on its share of every task's test data."""
    setup = _setup(msg, context)
    reply = EvaluateReply({}, {}, {})
    for slot in setup.slots:
        for task in slot.tasks:
            correct, count, loss = evaluate_adapter(
                setup.adapters, slot.name, task.test, setup.cfg.train.eval_batch_size
            )
            reply.correct[task.name] = correct
            reply.total[task.name] = count
            reply.loss[task.name] = loss
    return Message(content=reply.to_record(), reply_to=msg)


def update_pairs(
    instruction: RecordDict, reply: RecordDict
) -> list[tuple[str, ArrayRecord | None]]:
    """Each trained adapter of ``reply`` (its record name) and the global it started from
    (``None``: the client's own, local-only): what a mod clips, noises or attacks."""
    message = Instruction.from_record(instruction)
    answer = TrainReply.from_record(reply)
    sources = answer.slot_sources or message.sources(len(answer.adapters))
    return [
        (f"{ADAPTER_PREFIX}{slot_name(i)}", message.globals.get(source))
        for i, source in enumerate(sources)
    ]
