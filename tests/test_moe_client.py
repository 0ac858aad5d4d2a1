"""The FedMoE-DA client's expert synchronisation (Eq. 11) over the simulation peer transport."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from numpy.testing import assert_allclose

from client_app.fedmoe_da import Node, expert_proxies, sync_experts, train_model
from fedspecialists.config import MoESettings
from fedspecialists.models.moe import MoEClassifier, build_model, expert_outputs, expert_state
from fedspecialists.peer.exchange import GrantIssuer, LocalPeerStore
from fedspecialists.protocol.fedmoe_da import Instruction, Source

MOE = MoESettings(  # only what the model reads
    channels=[4],
    pooled_size=2,
    projection_dim=8,
    num_experts=2,
    top_k=1,
    expert_hidden=3,
    dense_hidden=None,
    private_experts=0,
    private_mode="routed",
)
CFG = SimpleNamespace(validation=SimpleNamespace(max_abs_value=1e4))


def _node(node_id: int, tmp_path: Path) -> tuple[Node, LocalPeerStore]:
    model = build_model((1, 8, 8), 3, MOE, dense=False, seed=node_id)
    folder = tmp_path / f"node-{node_id}"
    node = Node(CFG, "", node_id, node_id, (node_id, 4), None, model, ["backbone"], folder)  # type: ignore[arg-type]
    return node, LocalPeerStore(folder, max_bytes=1_000_000)


def _experts(node: Node) -> dict[str, dict[str, np.ndarray]]:
    state = {k: v.numpy().copy() for k, v in node.model.state_dict().items()}
    return {str(k): expert_state(state, k) for k in range(2)}


def _plan(
    sources: list[tuple[str, float, str, str]], issuer: GrantIssuer, node: int
) -> Instruction:
    """Round 2's training instruction to ``node``: mix its expert 0 from ``sources``."""
    return Instruction(
        server_round=2,
        share=["backbone"],
        exchange=True,
        grant_key=issuer.public_key,
        grant=issuer.issue(2, node, 60),
        plans={0: [Source(*s) for s in sources]},
    )


def _setup(
    tmp_path: Path,
) -> tuple[dict[int, Node], dict[int, LocalPeerStore], dict[int, Any], GrantIssuer]:
    issuer = GrantIssuer()
    nodes, stores, hashes = {}, {}, {}
    for n in (1, 2, 3):
        nodes[n], stores[n] = _node(n, tmp_path)
        stores[n].trust(issuer.public_key)
        hashes[n] = stores[n].publish(1, _experts(nodes[n]))
    return nodes, stores, hashes, issuer


def test_eq11_mixes_own_and_peer_experts(tmp_path: Path) -> None:
    nodes, stores, hashes, issuer = _setup(tmp_path)
    before = {n: _experts(nodes[n]) for n in nodes}
    plan = _plan(
        [
            ("1/0", 0.5, hashes[1]["0"], stores[1].address),
            ("1/1", 0.1, hashes[1]["1"], stores[1].address),  # an expert of the same client
            ("2/1", 0.4, hashes[2]["1"], stores[2].address),
        ],
        issuer,
        1,
    )
    result = sync_experts(nodes[1], plan, stores[1])
    after = _experts(nodes[1])
    for key, value in after["0"].items():
        expected = 0.5 * before[1]["0"][key] + 0.1 * before[1]["1"][key] + 0.4 * before[2]["1"][key]
        assert_allclose(value, expected, rtol=1e-5, atol=1e-7)
    for key, value in after["1"].items():  # no plan for expert 1: unchanged
        assert_allclose(value, before[1]["1"][key])
    assert result == {"fetches": 1, "failures": 0}
    assert (
        stores[1].bytes_fetched
        == (Path(stores[2].address) / "experts" / f"{hashes[2]['1']}.safetensors").stat().st_size
    )


def test_tampered_and_missing_peers_renormalise(tmp_path: Path) -> None:
    nodes, stores, hashes, issuer = _setup(tmp_path)
    before = {n: _experts(nodes[n]) for n in nodes}
    tampered = Path(stores[3].address) / "experts" / f"{hashes[3]['0']}.safetensors"
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 0x01
    tampered.write_bytes(bytes(data))
    plan = _plan(
        [
            ("1/0", 0.2, hashes[1]["0"], stores[1].address),
            ("2/0", 0.3, hashes[2]["0"], stores[2].address),
            ("3/0", 0.4, hashes[3]["0"], stores[3].address),  # tampered: refused
            ("4/0", 0.1, "b" * 64, str(tmp_path / "node-4")),  # never existed: unreachable
        ],
        issuer,
        1,
    )
    result = sync_experts(nodes[1], plan, stores[1])
    assert result == {"fetches": 1, "failures": 2}
    for key, value in _experts(nodes[1])["0"].items():
        expected = (0.2 * before[1]["0"][key] + 0.3 * before[2]["0"][key]) / 0.5
        assert_allclose(value, expected, rtol=1e-5, atol=1e-7)


def test_poisoned_expert_with_a_valid_hash_is_refused(tmp_path: Path) -> None:
    nodes, stores, _, issuer = _setup(tmp_path)
    with torch.no_grad():
        nodes[2].model.experts[0].fc1.weight.fill_(float("nan"))  # type: ignore[index,union-attr]
    poisoned = stores[2].publish(2, _experts(nodes[2]))["0"]  # hash matches the NaN content
    plan = _plan(
        [("1/0", 0.5, "", stores[1].address), ("2/0", 0.5, poisoned, stores[2].address)],
        issuer,
        1,
    )
    before = _experts(nodes[1])["0"]
    result = sync_experts(nodes[1], plan, stores[1])
    assert result == {"fetches": 0, "failures": 1}
    for key, value in _experts(nodes[1])["0"].items():
        assert_allclose(value, before[key], rtol=1e-6)  # only itself remained


def test_half_precision_peer_experts_are_mixed_in_float32(tmp_path: Path) -> None:
    nodes, stores, _, issuer = _setup(tmp_path)
    halves = {
        k: {n: v.astype(np.float16) for n, v in e.items()} for k, e in _experts(nodes[2]).items()
    }
    digest = stores[2].publish(2, halves)["1"]
    before = _experts(nodes[1])
    plan = _plan(
        [("1/0", 0.5, "", stores[1].address), ("2/1", 0.5, digest, stores[2].address)], issuer, 1
    )
    assert sync_experts(nodes[1], plan, stores[1]) == {"fetches": 1, "failures": 0}
    after = _experts(nodes[1])
    for key, value in after["0"].items():
        assert value.dtype == np.float32
        expected = 0.5 * before["0"][key] + 0.5 * halves["1"][key].astype(np.float32)
        assert_allclose(value, expected, rtol=1e-6)


def test_proxies_gate_its_change_and_the_mean_input_served(tmp_path: Path) -> None:
    node, _ = _node(1, tmp_path)
    assert isinstance(node.model, MoEClassifier)
    start = node.model.gate.weight.detach().numpy().copy()
    node.initial_gate = start
    with torch.no_grad():
        node.model.gate.weight.add_(1.0)
    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    node.data = SimpleNamespace(x_train=x)  # type: ignore[assignment]
    node.cfg = SimpleNamespace(  # type: ignore[assignment]
        fedmoe_da=SimpleNamespace(proxy="gate"), train=SimpleNamespace(eval_batch_size=2)
    )
    assert_allclose(expert_proxies(node), start + 1.0)
    node.cfg.fedmoe_da.proxy = "gate_update"
    assert_allclose(expert_proxies(node), np.ones_like(start), atol=1e-6)
    node.cfg.fedmoe_da.proxy = "output_update"
    node.outputs_at_start = expert_outputs(node.model)
    with torch.no_grad():
        node.model.experts[1].fc2.bias.add_(0.5)  # type: ignore[union-attr]
    change = expert_proxies(node)
    num_labels = node.model.experts[1].fc2.bias.shape[0]  # type: ignore[union-attr]
    assert change.shape == (start.shape[0], node.outputs_at_start.shape[1])
    assert_allclose(change[1, -num_labels:], 0.5, atol=1e-6)  # the bias, last in each row
    change[1, -num_labels:] = 0.0
    assert_allclose(change, 0.0, atol=1e-7)  # nothing else moved
    node.cfg.fedmoe_da.proxy = "routed_mean"
    with torch.no_grad():
        model = node.model
        assert isinstance(model, MoEClassifier)
        h = model.backbone(torch.from_numpy(x))
        p = torch.softmax(model.gate(h), dim=-1).numpy()
    h = h.numpy()
    expected = (p.T @ h) / p.sum(axis=0)[:, None]  # (K, d): each expert's weighted mean input
    assert_allclose(expert_proxies(node), expected, rtol=1e-5, atol=1e-6)


def test_declared_domain_proxies_come_from_the_client_training_domains(tmp_path: Path) -> None:
    node, _ = _node(1, tmp_path)
    assert isinstance(node.model, MoEClassifier)
    k = node.model.gate.weight.shape[0]
    domains = np.array([2, 2, 0, 2])  # 1 example of domain 0, none of 1, 3 of domain 2
    node.data = SimpleNamespace(  # type: ignore[assignment]
        domain_counts=lambda n: np.bincount(domains, minlength=n).tolist()
    )
    node.cfg = SimpleNamespace(  # type: ignore[assignment]
        fedmoe_da=SimpleNamespace(proxy="declared_domains"),
        suite=SimpleNamespace(tasks=[None, None, None]),
    )
    proxies = expert_proxies(node)
    assert proxies.shape == (k, 3 * k)
    for row in range(k):  # expert k's block holds (0.25, 0, 0.75), the rest is 0
        expected = np.zeros(3 * k)
        expected[3 * row : 3 * row + 3] = [0.25, 0.0, 0.75]
        assert_allclose(proxies[row], expected)


def _train_cfg(**train: object) -> SimpleNamespace:
    """What ``train_model`` reads: these ``train`` settings and the load-balancing weight."""
    return SimpleNamespace(
        train=SimpleNamespace(**train), moe=SimpleNamespace(load_balance_coef=0.01)
    )


def _forward_passes(local_steps: int | None, examples: int) -> int:
    model = build_model((1, 8, 8), 3, MOE, dense=False, seed=0)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    cfg = _train_cfg(
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.0,
        local_epochs=2.0,
        local_steps=local_steps,
        batch_size=4,
    )
    x = np.random.default_rng(0).random((examples, 1, 8, 8), dtype=np.float32)
    train_model(model, x, np.arange(examples) % 3, cfg, seed=0)  # type: ignore[arg-type]
    return len(calls)


def test_local_steps_fix_the_steps_per_round_whatever_the_data_size() -> None:
    assert _forward_passes(None, 10) == 5  # ceil(2 epochs * 10 / 4)
    assert _forward_passes(None, 20) == 10
    assert _forward_passes(7, 10) == 7
    assert _forward_passes(7, 20) == 7


def _expert_drift(prox_mu: float) -> float:
    """How far 20 steps move the experts (L2 over all their parameters) with ``prox_mu``."""
    model = build_model((1, 8, 8), 3, MOE, dense=False, seed=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "experts." in n}
    cfg = _train_cfg(
        optimizer="sgd",
        lr=0.05,
        momentum=0.0,
        weight_decay=0.0,
        local_epochs=1.0,
        local_steps=20,
        batch_size=4,
    )
    x = np.random.default_rng(0).random((12, 1, 8, 8), dtype=np.float32)
    train_model(model, x, np.arange(12) % 3, cfg, seed=0, prox_mu=prox_mu)  # type: ignore[arg-type]
    now = dict(model.named_parameters())
    return float(sum((now[n] - s).pow(2).sum() for n, s in start.items()) ** 0.5)


def test_the_proximal_term_holds_experts_near_their_start() -> None:
    free, held = _expert_drift(0.0), _expert_drift(10.0)
    assert free > 0
    assert held < 0.5 * free  # with SGD, mu * lr = 0.5 pulls half the deviation back each step


def test_private_experts_stay_home_and_out_of_the_proxies(tmp_path: Path) -> None:
    moe = MoESettings(**{**vars(MOE), "private_experts": 1})
    model = build_model((1, 8, 8), 3, moe, dense=False, seed=1)
    # shared as FedAvg-MoE shares: backbone, gate and experts; the private expert still stays
    node = Node(CFG, "", 1, 1, (1, 4), None, model, ["backbone", "gate", "experts"], tmp_path)  # type: ignore[arg-type]
    assert {k for k in node.personal_keys} == {
        "private_experts.0.fc1.weight",
        "private_experts.0.fc1.bias",
        "private_experts.0.fc2.weight",
        "private_experts.0.fc2.bias",
    }
    assert isinstance(node.model, MoEClassifier)
    start = node.model.gate.weight.detach().numpy().copy()  # (K + K_p, d) = (3, d)
    node.initial_gate = start
    with torch.no_grad():
        node.model.gate.weight.add_(torch.tensor([[1.0], [2.0], [3.0]]))
    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    node.data = SimpleNamespace(x_train=x)  # type: ignore[assignment]
    node.cfg = SimpleNamespace(  # type: ignore[assignment]
        fedmoe_da=SimpleNamespace(proxy="gate_update"), train=SimpleNamespace(eval_batch_size=2)
    )
    # the shared experts' rows only (K = 2): the private row's change (3.0) is not sent
    assert_allclose(expert_proxies(node), [[1.0] * start.shape[1], [2.0] * start.shape[1]])
    node.cfg.fedmoe_da.proxy = "routed_mean"
    with torch.no_grad():
        h = node.model.backbone(torch.from_numpy(x))
        p = torch.softmax(node.model.gate(h), dim=-1).numpy()[:, :2]  # over all 3, then K
    expected = (p.T @ h.numpy()) / p.sum(axis=0)[:, None]
    assert_allclose(expert_proxies(node), expected, rtol=1e-5, atol=1e-6)
