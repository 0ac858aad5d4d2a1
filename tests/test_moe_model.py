"""The mixture-of-experts model: Mixtral routing and the load-balancing loss by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from numpy.testing import assert_allclose

from fedspecialists.config import MoESettings
from fedspecialists.models.moe import (
    DenseClassifier,
    MoEClassifier,
    build_model,
    expert_state,
    load_balancing_loss,
    part_of,
    route,
)

MOE = MoESettings(  # only what the model reads
    channels=[4, 8],
    pooled_size=2,
    projection_dim=16,
    num_experts=3,
    top_k=2,
    expert_hidden=5,
    dense_hidden=None,
    private_experts=0,
    private_mode="routed",
)


def test_route_keeps_top_k_and_renormalises() -> None:
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]])  # softmax = 1/6, 2/6, 3/6
    combine, probs, selected = route(logits, top_k=2)
    assert_allclose(probs.numpy(), [[1 / 6, 2 / 6, 3 / 6]], rtol=1e-6)
    assert sorted(selected[0].tolist()) == [1, 2]
    # top-2 weights 2/6 and 3/6 renormalised: 0.4 and 0.6, the third expert gets nothing.
    assert_allclose(combine.numpy(), [[0.0, 0.4, 0.6]], rtol=1e-6)


def test_load_balancing_loss_by_hand() -> None:
    # Perfect balance: f = P = 1/K -> K * sum(1/K * 1/K) = 1.
    probs = torch.full((4, 2), 0.5)
    selected = torch.tensor([[0], [1], [0], [1]])
    assert float(load_balancing_loss(probs, selected)) == pytest.approx(1.0)
    # All routed to expert 0 with P = (0.9, 0.1): f = (1, 0) -> 2 * (1 * 0.9) = 1.8.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    selected = torch.tensor([[0], [0]])
    assert float(load_balancing_loss(probs, selected)) == pytest.approx(1.8)
    # top-2 of 3: assignments (0,1), (0,2) -> f = (2/4, 1/4, 1/4); P = mean rows = (.5, .3, .2).
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3]])
    selected = torch.tensor([[0, 1], [0, 2]])
    expected = 3 * (0.5 * 0.5 + 0.25 * 0.3 + 0.25 * 0.2)
    assert float(load_balancing_loss(probs, selected)) == pytest.approx(expected)


def test_moe_output_equals_sparse_dispatch() -> None:
    model = build_model((1, 12, 12), 4, MOE, dense=False, seed=0)
    assert isinstance(model, MoEClassifier)
    x = torch.rand(6, 1, 12, 12)
    out = model(x)
    h = model.backbone(x)
    probs = torch.softmax(model.gate(h), -1)
    for b in range(6):
        top = probs[b].topk(2)
        weights = top.values / top.values.sum()
        manual = sum(
            w * model.experts[int(i)](h[b : b + 1])[0]
            for w, i in zip(weights, top.indices, strict=False)
        )
        assert torch.allclose(out.logits[b], manual, atol=1e-6)
    assert out.router_probs.shape == (6, 3)
    assert out.selected.shape == (6, 2)


def test_parts_names_and_same_init_everywhere() -> None:
    a = build_model((1, 12, 12), 4, MOE, dense=False, seed=3).state_dict()
    b = build_model((1, 12, 12), 4, MOE, dense=False, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the federation's common start
    parts = {part_of(k) for k in a}
    assert parts == {"backbone", "gate", "expert.0", "expert.1", "expert.2"}
    assert a["gate.weight"].shape == (3, 8 * 2 * 2)  # one gate vector per expert
    assert set(expert_state(a, 1)) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_dense_model_has_a_similar_size_and_text_backbone() -> None:
    moe = build_model((1, 12, 12), 4, MOE, dense=False, seed=0)
    dense = build_model((1, 12, 12), 4, MOE, dense=True, seed=0)
    assert isinstance(dense, DenseClassifier)
    n_moe = sum(p.numel() for p in moe.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    assert abs(n_moe - n_dense) / n_moe < 0.2
    text = build_model((24,), 3, MOE, dense=False, seed=0)
    assert text(torch.rand(5, 24)).logits.shape == (5, 3)


@pytest.mark.parametrize("top_k", [0, 4])  # K = 3: the range is 1..3
def test_top_k_out_of_range_is_refused(top_k: int) -> None:
    bad = dataclasses.replace(MOE, top_k=top_k)
    with pytest.raises(ValueError, match=f"top_k must be in 1..3, not {top_k}"):
        build_model((1, 12, 12), 4, bad, dense=False, seed=0)


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_at_the_ends_of_its_range_is_accepted(top_k: int) -> None:
    model = build_model((1, 12, 12), 4, dataclasses.replace(MOE, top_k=top_k), dense=False, seed=0)
    assert isinstance(model, MoEClassifier)
    x = torch.rand(5, 1, 12, 12)
    out = model(x)
    assert out.selected.shape == (5, top_k)
    h = model.backbone(x)
    each = torch.stack([expert(h) for expert in model.experts], dim=1)  # (B, K, C)
    if top_k == 1:
        # Top-1: each row's argmax expert, renormalised to weight 1, alone makes the output.
        best = out.router_probs.argmax(-1)
        assert torch.equal(out.selected[:, 0], best)
        assert torch.allclose(out.logits, each[torch.arange(5), best], atol=1e-6)
    else:
        # Top-3 of K = 3: every expert once per row, weighted by the full softmax (sum 1).
        chosen = torch.zeros_like(out.router_probs).scatter(1, out.selected, 1.0)
        assert torch.equal(chosen, torch.ones(5, 3))
        mixed = (out.router_probs.unsqueeze(-1) * each).sum(1)
        assert torch.allclose(out.logits, mixed, atol=1e-6)


def test_private_experts_start_as_copies_and_leave_the_shared_start_alone() -> None:
    shared = build_model((1, 12, 12), 4, MOE, dense=False, seed=3).state_dict()
    model = build_model(
        (1, 12, 12), 4, dataclasses.replace(MOE, private_experts=2), dense=False, seed=3
    )
    assert isinstance(model, MoEClassifier)
    state = model.state_dict()
    assert list(state)[: len(shared)] == list(shared)  # the shared names, in their order
    for key, value in shared.items():  # the same common start as without private experts
        assert torch.equal(state[key] if key != "gate.weight" else state[key][:3], value)
    assert state["gate.weight"].shape == (5, 8 * 2 * 2)  # K + K_p gate vectors
    for j in range(2):  # private expert j starts as a copy of expert j
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            assert torch.equal(state[f"private_experts.{j}.{name}"], state[f"experts.{j}.{name}"])
    assert {part_of(k) for k in state} == {
        "backbone",
        "gate",
        "expert.0",
        "expert.1",
        "expert.2",
        "private_experts",
    }


def test_the_gate_routes_over_shared_and_private_experts() -> None:
    model = build_model(
        (1, 12, 12), 4, dataclasses.replace(MOE, private_experts=2), dense=False, seed=0
    )
    assert isinstance(model, MoEClassifier)
    with torch.no_grad():
        model.private_experts[1].fc2.bias.add_(1.0)  # type: ignore[operator]  # differs from expert 1
        model.gate.weight.zero_()
        model.gate.weight[4] = 1.0  # private expert 1 (index K + 1 = 4) ...
        model.gate.weight[0] = 0.5  # ... then shared expert 0
    x = torch.rand(3, 1, 12, 12)  # backbone outputs are >= 0 (ReLU, pooling): logit 4 wins
    out = model(x)
    h = model.backbone(x)
    assert out.router_probs.shape == (3, 5)
    assert out.selected[:, 0].tolist() == [4, 4, 4]
    assert out.selected[:, 1].tolist() == [0, 0, 0]
    probs = torch.softmax(model.gate(h), -1)
    w4, w0 = probs[:, 4], probs[:, 0]
    manual = (w4[:, None] * model.private_experts[1](h) + w0[:, None] * model.experts[0](h)) / (
        w4 + w0
    )[:, None]
    assert torch.allclose(out.logits, manual, atol=1e-6)


@pytest.mark.parametrize(
    ("private", "top_k", "message"),
    [
        (4, 2, "private_experts must be in 0..3, not 4"),
        (2, 6, "top_k must be in 1..5, not 6"),
    ],
)
def test_private_experts_out_of_range_are_refused(private: int, top_k: int, message: str) -> None:
    bad = dataclasses.replace(MOE, private_experts=private, top_k=top_k)
    with pytest.raises(ValueError, match=message):
        build_model((1, 12, 12), 4, bad, dense=False, seed=0)


def test_paired_private_experts_blend_with_the_expert_they_copy() -> None:
    """Slot j < K_p outputs sigma(b_j) E_j(h) + (1 - sigma(b_j)) P_j(h); the gate stays K wide."""
    paired = dataclasses.replace(MOE, private_experts=2, private_mode="paired")
    model = build_model((1, 12, 12), 4, paired, dense=False, seed=0)
    assert isinstance(model, MoEClassifier) and model.private_blend is not None
    state = model.state_dict()
    assert state["gate.weight"].shape == (3, 8 * 2 * 2)
    assert torch.equal(state["private_blend"], torch.zeros(2))  # half each at the start
    assert part_of("private_blend") == "private_blend"
    with torch.no_grad():
        model.private_experts[0].fc2.bias.add_(1.0)  # type: ignore[operator]
        model.private_experts[1].fc2.bias.add_(2.0)  # type: ignore[operator]
        model.private_blend[1] = math.log(3.0)  # sigma = 3/4
        model.gate.weight.zero_()
        model.gate.weight[1] = 1.0  # slot 1, then slot 0 (backbone outputs are >= 0)
        model.gate.weight[0] = 0.5
    x = torch.rand(3, 1, 12, 12)
    out = model(x)
    h = model.backbone(x)
    assert out.router_probs.shape == (3, 3) and out.selected[:, 0].tolist() == [1, 1, 1]
    slot0 = 0.5 * model.experts[0](h) + 0.5 * model.private_experts[0](h)
    slot1 = 0.75 * model.experts[1](h) + 0.25 * model.private_experts[1](h)
    # private expert j = expert j + c on the bias: the blend is expert j + (1 - sigma) c
    assert torch.allclose(slot0, model.experts[0](h) + 0.5, atol=1e-6)
    assert torch.allclose(slot1, model.experts[1](h) + 0.5, atol=1e-6)
    probs = torch.softmax(model.gate(h), -1)
    w1, w0 = probs[:, 1:2], probs[:, 0:1]
    assert torch.allclose(out.logits, (w1 * slot1 + w0 * slot0) / (w1 + w0), atol=1e-6)
    # no blend parameter at all without paired private experts (the default model is unchanged)
    assert "private_blend" not in build_model((1, 12, 12), 4, MOE, dense=False, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"top_k must be in 1\.\.3, not 4"):
        build_model((1, 12, 12), 4, dataclasses.replace(paired, top_k=4), dense=False, seed=0)
