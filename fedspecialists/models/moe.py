"""Mixture-of-experts classifier of the FedMoE-DA experiments, and its dense counterpart.

Per client (FedMoE-DA's model, our reading of the paper; see docs/methods.md)::

    x -> backbone -> h (B, d) -> gate: router logits = h @ Pi^T (B, K) -> top-k softmax weights
                              -> experts: y = sum_{k in top-k} w_k E_k(h)   (B, C)

The gate is one linear layer ``Pi`` (K, d) without bias, like Mixtral's router: row ``pi_k`` is
expert k's gate vector, the proxy FedMoE-DA's server compares (Eq. 8). Routing follows Mixtral:
softmax over all K logits, keep the top-k, renormalise them to sum to 1. The auxiliary
load-balancing loss is Switch Transformer's ``K * sum_e f_e P_e``.

Parameter names (what each method shares): ``backbone.*``, ``gate.weight`` and
``experts.<k>.*`` for the MoE model; ``backbone.*`` and ``head.*`` for the dense model.
With ``moe.private_experts`` = K_p > 0 the MoE model also holds ``private_experts.<j>.*``
(copies of experts 0..K_p-1 at the start) that no method ever sends anywhere. How they are
used (``moe.private_mode``): ``routed``, the gate routes over all K + K_p experts (its first K
rows stay the shared experts' gate vectors); ``paired``, the gate routes over the K slots and
slot j < K_p outputs ``sigma(b_j) E_j(h) + (1 - sigma(b_j)) P_j(h)``, its shared expert and its
private copy blended by a learnt ``private_blend`` b (K_p,), from 0 (half each).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedspecialists.config import PRIVATE_MODES, MoESettings, routed_experts

T = TypeVar("T")


class ConvBackbone(nn.Module):
    """Small plain-torch CNN: conv-ReLU-maxpool blocks, then adaptive average pooling.

    ``(B, C, H, W)`` -> ``(B, channels[-1] * pooled_size**2)``; any input size works.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], pooled_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            previous = width
        layers += [nn.AdaptiveAvgPool2d(pooled_size), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_dim = previous * pooled_size * pooled_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ProjectionBackbone(nn.Module):
    """Trainable part of the text backbone: frozen-encoder features ``(B, D)`` -> ``(B, d)``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Expert(nn.Module):
    """One expert: a two-layer MLP ``(B, d) -> (B, C)``."""

    def __init__(self, in_dim: int, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, num_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(h)))


@dataclass
class MoEOutput:
    """Logits ``(B, C)``, router probabilities ``(B, K)`` and chosen experts ``(B, top_k)``."""

    logits: torch.Tensor
    router_probs: torch.Tensor
    selected: torch.Tensor


def route(
    router_logits: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over experts, keep the top-k, renormalise them.

    Parameters
    ----------
    router_logits : torch.Tensor
        ``(B, K)``.
    top_k : int
        Experts used per input.

    Returns
    -------
    tuple of torch.Tensor
        Dense combine weights ``(B, K)`` (zero outside the top-k, rows summing to 1), router
        probabilities ``(B, K)`` and the selected expert indices ``(B, top_k)``.
    """
    probs = F.softmax(router_logits, dim=-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    combine = torch.zeros_like(probs).scatter(-1, top_i, top_w)
    return combine, probs, top_i


def load_balancing_loss(router_probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss ``K * sum_e f_e * P_e`` (1.0 when perfectly balanced).

    ``f_e`` is the fraction of routing assignments (B * top_k of them) that went to expert e and
    ``P_e`` the mean router probability of e. (Mixtral's version in transformers is ``top_k``
    times this.)

    Parameters
    ----------
    router_probs : torch.Tensor
        ``(B, K)`` softmax router probabilities.
    selected : torch.Tensor
        ``(B, top_k)`` chosen expert indices.
    """
    num_experts = router_probs.shape[-1]
    assignments = F.one_hot(selected, num_experts).float()  # (B, top_k, K)
    f = assignments.sum(dim=(0, 1)) / assignments.sum()
    p = router_probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


# Either backbone: ``(B, ...) -> (B, out_dim)``.
Backbone = ConvBackbone | ProjectionBackbone


class MoEClassifier(nn.Module):
    """Backbone, gate ``Pi`` (K, d), K experts and K_p private ones, top-k routing (the gate
    is (K + K_p, d) when the private experts are routed, ``private_mode="routed"``).

    Every expert runs on every input and the top-k combine weights zero the others: the same
    outputs and gradients as a sparse dispatch, and faster at these sizes (K small, d ~ 500).
    Private expert j starts as a copy of expert j. Routed: routing, outputs and the
    load-balancing loss index the experts in the order ``experts``, then ``private_experts``.
    Paired: slot j < K_p is its expert and private copy blended by ``private_blend`` (K_p,).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_experts: int,
        top_k: int,
        hidden: int,
        num_labels: int,
        private_experts: int = 0,
        private_mode: str = "routed",
    ) -> None:
        super().__init__()
        if not 0 <= private_experts <= num_experts:
            raise ValueError(f"private_experts must be in 0..{num_experts}, not {private_experts}")
        if private_mode not in PRIVATE_MODES:
            raise ValueError(f"private_mode must be one of {PRIVATE_MODES}, not {private_mode!r}")
        routed = routed_experts(num_experts, private_experts, private_mode)
        if not 1 <= top_k <= routed:
            raise ValueError(f"top_k must be in 1..{routed}, not {top_k}")
        self.backbone = backbone
        dim = backbone.out_dim
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(dim, hidden, num_labels) for _ in range(num_experts))
        self.private_experts = nn.ModuleList(
            copy.deepcopy(self.experts[j]) for j in range(private_experts)
        )
        blend = private_experts > 0 and private_mode == "paired"  # else no parameter at all
        self.private_blend = nn.Parameter(torch.zeros(private_experts)) if blend else None
        if routed > num_experts:  # drawn last: the shared parts start as they do with K_p = 0
            wide = nn.Linear(dim, routed, bias=False)
            with torch.no_grad():
                wide.weight[:num_experts] = self.gate.weight
            self.gate = wide  # same place in the state dict
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> MoEOutput:
        h = self.backbone(x)
        combine, probs, selected = route(self.gate(h), self.top_k)
        outputs = torch.stack([expert(h) for expert in self.experts], dim=1)  # (B, K, C)
        private = [expert(h) for expert in self.private_experts]
        if private and self.private_blend is not None:
            share = torch.sigmoid(self.private_blend)[None, :, None]  # (1, K_p, 1)
            paired = share * outputs[:, : len(private)] + (1 - share) * torch.stack(private, 1)
            outputs = torch.cat([paired, outputs[:, len(private) :]], dim=1)
        elif private:
            outputs = torch.cat([outputs, torch.stack(private, dim=1)], dim=1)  # (B, K + K_p, C)
        logits = torch.einsum("bk,bkc->bc", combine, outputs)
        return MoEOutput(logits, probs, selected)


class DenseClassifier(nn.Module):
    """The dense baseline: backbone and one MLP head ``(B, d) -> hidden -> (B, C)``."""

    def __init__(self, backbone: Backbone, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = Expert(backbone.out_dim, hidden, num_labels)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        logits = self.head(self.backbone(x))
        empty = torch.zeros(len(logits), 0, device=logits.device)
        return MoEOutput(logits, empty, empty.long())


def build_model(
    input_shape: Sequence[int],
    num_labels: int,
    moe_cfg: MoESettings,
    dense: bool,
    seed: int,
) -> MoEClassifier | DenseClassifier:
    """The model of ``moe_cfg`` for inputs of ``input_shape`` (``(C, H, W)`` or ``(D,)``).

    The same ``seed`` gives the same initial weights everywhere (the federation's common start).
    """
    torch.manual_seed(seed)
    backbone: Backbone
    if len(input_shape) == 3:
        backbone = ConvBackbone(int(input_shape[0]), list(moe_cfg.channels), moe_cfg.pooled_size)
    else:
        backbone = ProjectionBackbone(int(input_shape[0]), moe_cfg.projection_dim)
    num_experts, hidden = moe_cfg.num_experts, moe_cfg.expert_hidden
    if dense:
        dense_hidden = moe_cfg.dense_hidden or num_experts * hidden
        return DenseClassifier(backbone, int(dense_hidden), num_labels)
    return MoEClassifier(
        backbone,
        num_experts,
        moe_cfg.top_k,
        hidden,
        num_labels,
        moe_cfg.private_experts,
        moe_cfg.private_mode,
    )


@torch.no_grad()
def expert_outputs(model: MoEClassifier) -> np.ndarray:
    """``(K, C * (h + 1))``: each expert's output layer (``fc2`` weight and bias), flattened."""
    rows = []
    for expert in model.experts:
        assert isinstance(expert, Expert)
        rows.append(torch.cat([expert.fc2.weight.flatten(), expert.fc2.bias]).cpu().numpy())
    return np.stack(rows).astype(np.float64)


def part_of(name: str) -> str:
    """Which part a parameter belongs to: ``backbone``, ``gate``, ``expert.<k>``,
    ``private_experts`` or ``private_blend`` (no method shares them) or ``head``."""
    if name.startswith("experts."):
        return "expert." + name.split(".")[1]
    return name.split(".")[0]


def expert_state(state: Mapping[str, T], k: int) -> dict[str, T]:
    """Expert k's parameters with the ``experts.<k>.`` prefix stripped (``fc1.weight``, ...)."""
    prefix = f"experts.{k}."
    return {key[len(prefix) :]: v for key, v in state.items() if key.startswith(prefix)}
