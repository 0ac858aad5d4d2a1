"""The local-training helpers every ClientApp shares, against values worked out by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from client_app.training import (
    local_batch_size,
    make_optimizer,
    proximal_term,
    round_seed,
    steps_per_round,
)
from fedspecialists.config import TrainSettings

BASE = TrainSettings(
    optimizer="adamw",
    momentum=0.9,
    local_epochs=2.0,
    local_steps=None,
    batch_size=32,
    lr=3e-3,
    weight_decay=0.0,
    eval_batch_size=64,
    num_threads=1,
    device="cpu",
)


@pytest.mark.parametrize(
    ("examples", "batch", "steps"),
    [
        (500, 32, 32),  # 2 * 500 / 32 = 31.25 -> 32 (ceil, for every method)
        (512, 32, 32),  # exactly 32
        (50, 32, 4),  # 2 * 50 / 32 = 3.125 -> 4
        (3, 16, 2),  # fewer examples than a batch: batch 3, 2 epochs = 2 steps
        (1, 16, 2),
    ],
)
def test_steps_per_round_are_the_ceiling_of_epochs_over_batches(
    examples: int, batch: int, steps: int
) -> None:
    assert steps_per_round(replace(BASE, batch_size=batch), examples) == steps


def test_local_steps_override_the_epochs_and_a_half_epoch_still_trains() -> None:
    assert steps_per_round(replace(BASE, local_steps=7), 10_000) == 7
    assert steps_per_round(replace(BASE, local_epochs=0.01), 10) == 1  # 0.01 * 10 / 10 -> 1


def test_local_batch_size_is_capped_by_the_data() -> None:
    assert local_batch_size(BASE, 100) == 32
    assert local_batch_size(BASE, 5) == 5
    assert local_batch_size(BASE, 0) == 1


def test_round_seed_by_hand() -> None:
    assert round_seed(0, 1, 0) == 1_009
    assert round_seed(2, 3, 4, 1) == 2 * 1_000_003 + 3 * 1_009 + 4 * 31 + 1
    seeds = {round_seed(0, r, p, i) for r in range(1, 21) for p in range(30) for i in range(4)}
    assert len(seeds) == 20 * 30 * 4  # distinct for every round, node and slot of a run


def test_make_optimizer_follows_the_settings() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    adamw = make_optimizer(params, BASE)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["lr"] == pytest.approx(3e-3)
    sgd = make_optimizer(params, replace(BASE, optimizer="sgd", lr=0.1))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == pytest.approx(0.9)


def test_a_sites_own_num_threads_wins_over_the_runs() -> None:
    import os

    from client_app.node import torch_threads

    assert torch_threads({"num-threads": 1}, 4) == 1  # the site's share of its machine
    assert torch_threads({"num-threads": "3"}, 0) == 3  # node config values may be strings
    assert torch_threads({}, 4) == 4  # no site setting: the run's train.num_threads
    assert torch_threads({"num-threads": 0}, 2) == 2  # 0 = not set here
    assert torch_threads({}, 0) == (os.cpu_count() or 1)  # 0 in both: every core
    for bad in (-1, "two", 1.5):
        with pytest.raises(ValueError, match="node config 'num-threads'"):
            torch_threads({"num-threads": bad}, 0)


def test_proximal_term_by_hand() -> None:
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0], requires_grad=True)
    # only a is held: 0.5 * 0.5 * ((1 - 0)^2 + (2 - 0)^2) = 1.25; its gradient mu * (a - a0)
    term = proximal_term({"a": a, "b": b}, {"a": torch.zeros(2)}, mu=0.5)
    assert float(term) == pytest.approx(1.25)
    term.backward()
    assert a.grad is not None and a.grad.tolist() == pytest.approx([0.5, 1.0])
    assert b.grad is None
    assert float(proximal_term({"a": a}, {}, mu=0.5)) == 0.0
