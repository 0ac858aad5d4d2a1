"""ClientApp handlers of the mixture-of-experts methods (FedMoE-DA and its baselines).

One training round of a FedMoE-DA client::

    shared parts from the server  +  personal parts from its own store
    -> fetch the peer experts its sync plan names, check them, mix (Eq. 11)
    -> train backbone, gate and experts (cross-entropy + load-balancing loss)
    -> keep personal parts, publish experts to peers
    -> reply: shared parts, gate vectors (proxies), expert hashes, metrics

What the server does not aggregate stays on the node, in
``<node dir>/run-<run key>/personal.safetensors`` (one folder per run, so a later run on the same
site never starts from an earlier run's experts; the run key is the Flower run id the run first
started under, so a resumed run finds it) (the final personalised model of every client,
loadable with ``safetensors``), and each round's version beside it in ``rounds/`` (the last
two): a round starts from the version of the round before it, so a run resumed after a crash
in the middle of a round starts that round from where it began. The node folder
is ``<peer root>/node-<client id>`` in simulation (the root comes from the server), or the
``peer-store`` key of ``--node-config`` in a deployment, where ``peer-address`` (this site's
gRPC peer endpoint, ``fedspecialists-peer``) and ``peer-root-certificates`` select the network
transport.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common.logger import log
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from client_app.node import (
    client_id_of,
    config_as,
    data_dir_of,
    device_of,
    partition_of,
    run_config,
)
from client_app.training import (
    local_batch_size,
    make_optimizer,
    proximal_term,
    round_seed,
    steps_per_round,
)
from fedspecialists import methods
from fedspecialists.config import MoERunConfig
from fedspecialists.data.domains import (
    ClientDomains,
    global_test_set,
    load_domains,
    model_input,
    site_domains,
    suite_partition,
)
from fedspecialists.models.moe import (
    DenseClassifier,
    MoEClassifier,
    build_model,
    expert_outputs,
    expert_state,
    load_balancing_loss,
    part_of,
)
from fedspecialists.peer.exchange import (
    ChangedOnlyFetch,
    ExpertRef,
    LocalPeerStore,
    PeerFetchError,
    PeerTransport,
)
from fedspecialists.peer.grpc_endpoint import GrpcPeerTransport
from fedspecialists.protocol.fedmoe_da import (
    GATE,
    SHARED,
    EvaluateReply,
    Instruction,
    TrainReply,
)
from fedspecialists.protocol.records import check_adapter, record_to_state, state_to_record
from strategies.fedmoe_da import (
    declared_domain_proxies,
    mix_experts,
    renormalise,
    routed_means,
)

PERSONAL_FILE = "personal.safetensors"


@lru_cache(maxsize=16)
def _client_data(overrides: str, partition: tuple[int, int], data_dir: str) -> ClientDomains:
    """A partition of the suite's domains, or the site's own files (``data-dir`` in node config)."""
    cfg = config_as(overrides, MoERunConfig)
    if data_dir:
        return site_domains(cfg, data_dir)
    return suite_partition(cfg, *partition)


@lru_cache(maxsize=4)
def _model_input(overrides: str) -> tuple[tuple[int, ...], int]:
    """The model's input shape and label width (read once per process, not per message)."""
    return model_input(config_as(overrides, MoERunConfig))


@lru_cache(maxsize=4)
def _global_test(overrides: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cfg = config_as(overrides, MoERunConfig)
    return global_test_set(load_domains(cfg), cfg.moe.global_test_per_domain, cfg.seed)


@dataclass
class Node:
    """What one message's handler works with."""

    cfg: MoERunConfig
    overrides: str
    node_id: int
    client_id: int  # protocol.identity: what the server's plans name this client by
    partition: tuple[int, int]
    data: ClientDomains
    model: MoEClassifier | DenseClassifier
    shared_parts: list[str]
    folder: Path
    run_key: str = "0"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    own_data: bool = False  # the site's own files: no global test set (no site holds all data)
    initial_gate: np.ndarray | None = None  # (K, d) the federation's common starting gate
    outputs_at_start: np.ndarray | None = None  # experts' output layers when training began

    @property
    def personal_keys(self) -> list[str]:
        return [k for k in self.model.state_dict() if not _is_shared(k, self.shared_parts)]


def _is_shared(key: str, parts: list[str]) -> bool:
    part = part_of(key)
    return part in parts or (part.startswith("expert.") and "experts" in parts)


def _node(instruction: Instruction, context: Context, phase: str) -> Node:
    """Build the model and load this node's state: initial, then personal, then shared.

    The personal parts are those this node kept after its last training before this round's
    (``phase`` ``train``) or after this round's (``evaluate``)."""
    overrides, cfg = run_config(context, MoERunConfig)
    data_dir = data_dir_of(context, cfg) or ""
    partition = partition_of(context, own_files=bool(data_dir))
    if context.node_config.get("peer-store"):  # a deployment names the site's folder
        folder = Path(str(context.node_config["peer-store"]))
    else:
        root = instruction.peer_root
        if not root:
            raise ValueError("no peer store: set peer-store in --node-config (or peer.root)")
        folder = Path(str(root)) / f"node-{client_id_of(context)}"
    folder.mkdir(parents=True, exist_ok=True)
    data = _client_data(overrides, partition, data_dir)
    input_shape, num_labels = _model_input(overrides)
    if tuple(data.x_train.shape[1:]) != input_shape:
        raise ValueError(
            f"this site's inputs have shape {data.x_train.shape[1:]}, the model reads {input_shape}"
        )
    model = build_model(
        input_shape,
        num_labels,
        cfg.moe,
        dense=methods.get(cfg.method.name).model == "dense",
        seed=cfg.seed,  # the federation's common initialisation
    )
    node = Node(
        cfg,
        overrides,
        int(context.node_id),
        client_id_of(context),
        partition,
        data,
        model,
        instruction.share,
        folder,
        instruction.run_key or str(context.run_id),
        own_data=bool(data_dir),
    )
    if isinstance(model, MoEClassifier):
        node.initial_gate = model.gate.weight.detach().numpy().copy()
    upto = instruction.server_round - 1 if phase == "train" else instruction.server_round
    personal = personal_version(folder / f"run-{node.run_key}", upto)
    if personal is not None:
        model.load_state_dict(load_file(personal), strict=False)
    if instruction.shared is not None:
        model.load_state_dict(record_to_state(instruction.shared), strict=False)
    node.device = device_of(context, cfg)
    model.to(node.device)
    return node


# --------------------------------------------------------------------------------------------
# Expert synchronisation (Eq. 11 with peer experts)
# --------------------------------------------------------------------------------------------


def _transport(node: Node, context: Context) -> PeerTransport:
    """Simulation: node folders peers read directly. A deployment (``peer-address`` in
    ``--node-config``): this site's folder, served to peers by its gRPC endpoint. With
    ``peer.fetch_changed_only`` either one re-uses the peer experts this node already holds."""
    node_config = context.node_config
    transport: PeerTransport
    if node_config.get("peer-address"):
        certs = node_config.get("peer-root-certificates")
        transport = GrpcPeerTransport(
            node.folder,
            str(node_config["peer-address"]),
            Path(str(certs)) if certs else None,
            node.cfg.peer.max_bytes,
            node.cfg.peer.timeout_s,
        )
    else:
        transport = LocalPeerStore(node.folder, node.cfg.peer.max_bytes)
    if node.cfg.peer.fetch_changed_only:
        return ChangedOnlyFetch(transport, node.folder / f"run-{node.run_key}")
    return transport


def sync_experts(node: Node, plan: Instruction, transport: PeerTransport) -> dict[str, int]:
    """Mix every expert named in this node's sync plan (Eq. 11), over the experts that arrived.

    Sources owned by this node are read from its own model; peers' through ``transport``,
    checked against the owner's hash and against the expected keys, shapes and value bound. A
    source that fails is dropped and the weights renormalised over the rest.

    Returns
    -------
    dict
        ``fetches`` (peer experts used), ``failures`` (peer experts refused or unreachable).
    """
    model = node.model
    assert isinstance(model, MoEClassifier)
    state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    own = {k: expert_state(state, k) for k in range(len(model.experts))}  # type: ignore[arg-type]
    fetch = PlanFetcher(node, transport, plan.grant, own)
    plans = {k: sources for k, sources in plan.plans.items() if k < len(model.experts)}
    for k, sources in plans.items():
        experts = [fetch(s.expert_id, s.sha256, s.address, k) for s in sources]
        arrived = [e is not None for e in experts]
        w = renormalise([s.weight for s in sources], arrived)
        mixed = mix_experts(
            [wi for wi, ok in zip(w.tolist(), arrived, strict=True) if ok],
            [e for e in experts if e is not None],
        )
        for name, value in mixed.items():
            state[f"experts.{k}.{name}"] = value
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})  # copies to device
    if isinstance(transport, ChangedOnlyFetch):  # keep only what this plan used
        transport.prune(plan.planned_hashes())
    return {"fetches": fetch.fetches, "failures": fetch.failures}


@dataclass
class PlanFetcher:
    """The source experts of one sync plan: this node's own, or a peer's, fetched once each.

    A peer's expert is checked against the expected keys, shapes and value bound (those of
    expert ``k``, the one it is mixed into); one that fails is ``None`` and counted.
    """

    node: Node
    transport: PeerTransport
    grant: str | None
    own: dict[int, dict[str, np.ndarray]]
    fetched: dict[str, dict[str, np.ndarray] | None] = field(default_factory=dict)
    fetches: int = 0
    failures: int = 0

    def __call__(
        self, expert_id: str, sha: str, address: str, k: int
    ) -> dict[str, np.ndarray] | None:
        owner, index = (int(x) for x in expert_id.split("/"))
        if owner == self.node.client_id:
            return self.own[index]
        if expert_id not in self.fetched:
            self.fetched[expert_id] = self._fetch(ExpertRef(expert_id, owner, address, sha), k)
        return self.fetched[expert_id]

    def _fetch(self, ref: ExpertRef, k: int) -> dict[str, np.ndarray] | None:
        node = self.node
        try:
            tensors = _as_dtypes(
                self.transport.fetch(ref, self.grant, requester=node.node_id), self.own[k]
            )
            reason = check_adapter(tensors, self.own[k], node.cfg.validation.max_abs_value)
            if reason is not None:
                raise PeerFetchError(f"expert {ref.expert_id}: {reason}")
        except PeerFetchError as exc:
            log(WARNING, "node %s: peer expert refused: %s", node.node_id, exc)
            self.failures += 1
            return None
        self.fetches += 1
        return tensors


def _as_dtypes(
    tensors: dict[str, np.ndarray], like: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """A half-precision payload (``peer.half_precision``) back in the dtypes of ``like``; a key
    ``like`` lacks is left as it is, for the checks to refuse."""
    return {
        key: value.astype(like[key].dtype)
        if key in like and value.dtype == np.float16 and like[key].dtype != np.float16
        else value
        for key, value in tensors.items()
    }


@torch.no_grad()
def expert_proxies(node: Node) -> np.ndarray:
    """``(K, d)``: what stands for each expert in the server's Eq. 8 (``fedmoe_da.proxy``).

    ``gate``: the gate rows pi_k (the paper's proxy). ``gate_update``: their change since the
    federation's common start (every client's gate starts from the same rows, which otherwise
    dominate the cosine). ``routed_mean``: the mean backbone output of this client's training
    inputs, weighted by each expert's router probability (reveals an average of the client's
    features, like FL-TAC's fingerprints). ``declared_domains``: the client's known domain
    mixture, placed at each expert's index (a measure of a proxy that finds the domains).
    ``output_update``: the change of each expert's output layer in this round's training (from
    after the mix to the end), what this client's labels did to it: ``(K, C * (h + 1))``.
    """
    model = node.model
    assert isinstance(model, MoEClassifier)
    k = len(model.experts)  # the shared experts' rows; private experts' rows stay home
    gate = model.gate.weight.detach().cpu().numpy()[:k]
    mode = node.cfg.fedmoe_da.proxy
    if mode == "gate":
        return gate
    if mode == "gate_update":
        assert node.initial_gate is not None
        return gate - node.initial_gate[:k]
    if mode == "declared_domains":
        counts = node.data.domain_counts(len(node.cfg.suite.tasks))
        return declared_domain_proxies(counts, gate.shape[0])
    if mode == "output_update":
        assert node.outputs_at_start is not None
        return expert_outputs(model) - node.outputs_at_start
    model.eval()
    device = next(model.parameters()).device
    feats, probs = [], []
    batch = node.cfg.train.eval_batch_size
    for start in range(0, len(node.data.x_train), batch):
        h = model.backbone(torch.from_numpy(node.data.x_train[start : start + batch]).to(device))
        feats.append(h.cpu())
        probs.append(torch.softmax(model.gate(h), dim=-1)[:, :k].cpu())
    return routed_means(torch.cat(feats).numpy(), torch.cat(probs).numpy())


# --------------------------------------------------------------------------------------------
# Local training and evaluation
# --------------------------------------------------------------------------------------------


def train_model(
    model: MoEClassifier | DenseClassifier,
    x: np.ndarray,
    y: np.ndarray,
    cfg: MoERunConfig,
    seed: int,
    prox_mu: float = 0.0,
) -> tuple[float, float]:
    """Local epochs of cross-entropy (+ load-balancing loss for MoE). Returns mean (CE, aux).

    ``prox_mu > 0``: plus FedProx's term holding every expert parameter near its value at the
    start of training (after this round's mix) [ours]."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    named = dict(model.named_parameters())
    anchor = {
        n: p.detach().clone() for n, p in named.items() if prox_mu > 0 and n.startswith("experts.")
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.train)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batch_size = local_batch_size(cfg.train, len(y))
    steps = steps_per_round(cfg.train, len(y))
    model.train()
    ce_sum = aux_sum = 0.0
    order = torch.randperm(len(y), generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor >= len(order):
            order, cursor = torch.randperm(len(y), generator=generator), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        out = model(xt[idx].to(device))
        ce = F.cross_entropy(out.logits, yt[idx].to(device))
        loss = ce
        if isinstance(model, MoEClassifier):
            aux = load_balancing_loss(out.router_probs, out.selected)
            loss = ce + cfg.moe.load_balance_coef * aux
            aux_sum += float(aux.detach())
        if prox_mu > 0:
            loss = loss + proximal_term(named, anchor, prox_mu)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ce_sum += float(ce.detach())
    return ce_sum / steps, aux_sum / steps


@torch.no_grad()
def predict(
    model: MoEClassifier | DenseClassifier, x: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicted labels ``(N,)`` and, for MoE, the chosen experts ``(N, top_k)``."""
    model.eval()
    device = next(model.parameters()).device
    preds, chosen = [], []
    for start in range(0, len(x), batch_size):
        out = model(torch.from_numpy(x[start : start + batch_size]).to(device))
        preds.append(out.logits.argmax(-1).cpu())
        chosen.append(out.selected.cpu())
    selected = torch.cat(chosen).numpy() if isinstance(model, MoEClassifier) else None
    return torch.cat(preds).numpy(), selected


# --------------------------------------------------------------------------------------------
# Message handlers
# --------------------------------------------------------------------------------------------


def personal_version(run_folder: Path, upto: int) -> Path | None:
    """This node's personal parts as its last training at or before round ``upto`` left them
    (``rounds/personal-r<round>.safetensors``; a folder without rounds: ``personal``)."""
    versions = sorted(
        (int(p.stem.rsplit("-r", 1)[1]), p)
        for p in (run_folder / "rounds").glob("personal-r*.safetensors")
    )
    usable = [p for r, p in versions if r <= upto]
    if usable:
        return usable[-1]
    latest = run_folder / PERSONAL_FILE
    return latest if latest.exists() and not versions else None


def _save_personal(node: Node, state: dict[str, torch.Tensor], server_round: int) -> None:
    """Keep this node's personal parts on disk (they never leave it): the latest, and this
    round's version (the last two rounds' are kept, what a resumed round starts from)."""
    personal = {k: state[k].contiguous() for k in node.personal_keys}
    if not personal:
        return
    run_folder = node.folder / f"run-{node.run_key}"
    (run_folder / "rounds").mkdir(parents=True, exist_ok=True)
    save_file(personal, run_folder / "rounds" / f"personal-r{server_round}.safetensors")
    save_file(personal, run_folder / PERSONAL_FILE)
    for old in sorted(
        (run_folder / "rounds").glob("personal-r*.safetensors"),
        key=lambda p: int(p.stem.rsplit("-r", 1)[1]),
    )[:-2]:
        old.unlink(missing_ok=True)


def _publish_experts(
    node: Node,
    state: dict[str, torch.Tensor],
    transport: PeerTransport,
    server_round: int,
    reply: TrainReply,
) -> None:
    """Serve this node's trained experts to peers; put their proxies and hashes in ``reply``."""
    model = node.model
    assert isinstance(model, MoEClassifier)
    numpy_state = {k: v.numpy() for k, v in state.items()}
    experts = {str(k): expert_state(numpy_state, k) for k in range(len(model.experts))}  # type: ignore[arg-type]
    if node.cfg.peer.half_precision:
        experts = {k: {n: v.astype(np.float16) for n, v in e.items()} for k, e in experts.items()}
    hashes = transport.publish(server_round, experts)
    proxies = torch.from_numpy(np.ascontiguousarray(expert_proxies(node), dtype=np.float32))
    reply.proxies = state_to_record({GATE: proxies})
    reply.hashes = [hashes[str(k)] for k in range(len(model.experts))]
    reply.address = transport.address


def train(msg: Message, context: Context) -> Message:
    """One round: sync experts from peers, train, keep personal parts, publish, reply."""
    started = time.perf_counter()
    instruction = Instruction.from_record(msg.content)
    node = _node(instruction, context, "train")
    cfg = node.cfg
    server_round = instruction.server_round
    transport = _transport(node, context) if instruction.exchange else None
    sync = {"fetches": 0, "failures": 0}
    if transport is not None:
        transport.trust(str(instruction.grant_key), server_round)
        if instruction.plans:
            sync = sync_experts(node, instruction, transport)
    if isinstance(node.model, MoEClassifier) and cfg.fedmoe_da.proxy == "output_update":
        node.outputs_at_start = expert_outputs(node.model)
    seed = round_seed(cfg.seed, server_round, node.partition[0])
    mu = cfg.fedmoe_da.prox_mu if instruction.exchange else 0.0  # no exchange, no mix to hold
    ce, aux = train_model(node.model, node.data.x_train, node.data.y_train, cfg, seed, mu)
    # Accuracy of the model as local training left it (own backbone), next to the evaluate
    # round's, which uses the server's aggregate of the shared parts.
    pred, _ = predict(node.model, node.data.x_test, cfg.train.eval_batch_size)
    local_correct = int((pred == node.data.y_test).sum())
    state = {k: v.detach().cpu() for k, v in node.model.state_dict().items()}
    _save_personal(node, state, server_round)
    shared = {k: v for k, v in state.items() if _is_shared(k, node.shared_parts)}
    reply = TrainReply(
        num_examples=len(node.data.y_train),
        train_loss=ce,
        aux_loss=aux,
        peer_bytes=transport.bytes_fetched if transport is not None else 0,
        peer_fetches=sync["fetches"],
        peer_failures=sync["failures"],
        peer_reused=transport.reused if isinstance(transport, ChangedOnlyFetch) else 0,
        domain_examples=node.data.domain_counts(len(cfg.suite.tasks)),
        after_training_correct=local_correct,
        after_training_total=len(node.data.y_test),
        shared=state_to_record(shared) if shared else None,
    )
    if transport is not None:
        _publish_experts(node, state, transport, server_round, reply)
    log(
        INFO,
        "partition %s: round %s trained on %s examples (loss %.3f), %s peer experts (%s refused), "
        "%.1fs",
        node.partition[0],
        server_round,
        len(node.data.y_train),
        ce,
        sync["fetches"],
        sync["failures"],
        time.perf_counter() - started,
    )
    return Message(content=reply.to_record(), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Personalised accuracy (own test split, per domain), global test accuracy and routing."""
    node = _node(Instruction.from_record(msg.content), context, "evaluate")
    cfg, data = node.cfg, node.data
    num_domains = len(cfg.suite.tasks)
    batch = cfg.train.eval_batch_size
    pred, selected = predict(node.model, data.x_test, batch)
    hit = pred == data.y_test
    global_correct = global_total = 0
    if not node.own_data:
        x_global, y_global, _ = _global_test(node.overrides)
        global_pred, _ = predict(node.model, x_global, batch)
        global_correct, global_total = int((global_pred == y_global).sum()), len(y_global)
    reply = EvaluateReply(
        personal_correct=int(hit.sum()),
        personal_total=len(hit),
        global_correct=global_correct,
        global_total=global_total,
        domain_correct=np.bincount(data.d_test, weights=hit, minlength=num_domains)
        .astype(int)
        .tolist(),
        domain_total=np.bincount(data.d_test, minlength=num_domains).tolist(),
    )
    if selected is not None:
        assert isinstance(node.model, MoEClassifier)
        k = node.model.gate.out_features  # K, or K + K_p with routed private experts
        counts = np.zeros((num_domains, k), dtype=np.int64)
        np.add.at(counts, (np.repeat(data.d_test, selected.shape[1]), selected.ravel()), 1)
        reply.routing = counts.ravel().tolist()
    return Message(content=reply.to_record(), reply_to=msg)


def update_pairs(
    instruction: RecordDict, reply: RecordDict
) -> list[tuple[str, ArrayRecord | None]]:
    """The trained shared parts of ``reply`` and the aggregate they started from (what a mod
    clips, noises or attacks); none for a method that shares nothing."""
    if SHARED not in reply.array_records:
        return []
    return [(SHARED, Instruction.from_record(instruction).shared)]
