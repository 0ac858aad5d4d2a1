"""Adapters through records and through peft's save/load; the shared-width head's masking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from numpy.testing import assert_allclose
from peft import PeftModel

from client_app.fltac_training import masked_logits
from fedspecialists.config import AdapterRunConfig, load_config_as
from fedspecialists.models.lora import (
    build_base_model,
    build_preprocessor,
    get_adapter_model,
    initial_adapter,
    suite_kind,
)
from fedspecialists.protocol.records import (
    check_adapter,
    record_to_numpy,
    record_to_state,
    state_to_record,
)
from server_app.outputs import save_adapters

TINY = "model=tiny_bert suite=tiny_text"


def _batch(cfg) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    tok = build_preprocessor(cfg.model, suite_kind(cfg))
    return dict(tok(["a short sentence", "another text here"], padding=True, return_tensors="pt"))


def test_adapter_round_trip_through_records_is_exact() -> None:
    cfg = load_config_as(AdapterRunConfig, TINY)
    model = get_adapter_model(cfg, num_labels=5)
    original = initial_adapter(cfg, 5)
    perturbed = {k: v + 0.01 * torch.randn_like(v) for k, v in original.items()}
    record = state_to_record(perturbed)
    model.load("slot1", record_to_state(record))
    back = model.state("slot1")
    assert sorted(back) == sorted(perturbed)
    for key, value in perturbed.items():
        assert_allclose(back[key].numpy(), value.numpy())
    assert (
        check_adapter(record_to_numpy(record), {k: v.numpy() for k, v in original.items()}, 1e4)
        is None
    )


def test_initial_adapter_is_lora_with_zero_b_and_a_head() -> None:
    cfg = load_config_as(AdapterRunConfig, TINY)
    v0 = initial_adapter(cfg, 5)
    lora_b = [v for k, v in v0.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().sum()) == 0.0 for v in lora_b)
    assert any("classifier" in k for k in v0)
    assert all(v.shape[0] == 1 for k, v in v0.items() if "lora_A" in k)  # rank 1


def test_saved_adapters_load_with_peft_from_pretrained(tmp_path: Path) -> None:
    cfg = load_config_as(AdapterRunConfig, TINY)
    v0 = initial_adapter(cfg, 5)
    trained = {k: (v + 0.05 * torch.randn_like(v)).numpy() for k, v in v0.items()}
    save_adapters(tmp_path, cfg, 5, {"g0": trained}, {"g0": "bbc_topic"})
    torch.manual_seed(cfg.seed)  # the tiny base model is random: rebuild the same one
    base = build_base_model(cfg.model, suite_kind(cfg), 5)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapters" / "g0"))
    loaded.eval()
    state = {k: v for k, v in loaded.state_dict().items() if "lora_A" in k}
    assert state, "no LoRA weights loaded"
    reference = get_adapter_model(cfg, 5)
    reference.load("slot0", {k: torch.as_tensor(v) for k, v in trained.items()})
    reference.activate("slot0")
    reference.model.eval()
    batch = _batch(cfg)
    with torch.no_grad():
        assert_allclose(
            loaded(**batch).logits.numpy(), reference.model(**batch).logits.numpy(), atol=1e-5
        )


def test_masked_logits_hide_the_labels_a_task_does_not_have() -> None:
    logits = torch.tensor([[1.0, 2.0, 9.0], [1.0, 2.0, 9.0]])
    masked = masked_logits(logits, torch.tensor([2, 3]))
    assert masked[0].argmax() == 1  # a 2-label task never predicts label 2
    assert masked[1].argmax() == 2
    probs = torch.softmax(masked[0], -1)
    assert float(probs[2]) == 0.0
    assert np.isclose(float(probs[:2].sum()), 1.0)


def test_input_fingerprint_is_the_frozen_models_mean_head_input() -> None:
    # Prepare: a tiny model, an adapter perturbed away from v0, two examples.
    from client_app.fltac_training import Encoded, input_fingerprint

    cfg = load_config_as(AdapterRunConfig, TINY)
    model = get_adapter_model(cfg, num_labels=3)
    tok = build_preprocessor(cfg.model, suite_kind(cfg))
    texts = ["a short sentence", "another text here, longer"]
    ids = tok(texts)
    enc = Encoded(
        inputs=[{k: ids[k][i] for k in ids} for i in range(2)],
        labels=torch.tensor([0, 1]),
        num_labels=torch.tensor([3, 3]),
        tasks=["t", "t"],
        kind="text_classification",
        pad_token_id=int(tok.pad_token_id or 0),
    )
    state = initial_adapter(cfg, 3)
    model.load("slot0", {k: v + 0.5 * torch.randn_like(v) for k, v in state.items()})
    model.activate("slot0")

    # Execute: batches of one and of two give the same mean.
    one = input_fingerprint(model, enc, 1, cfg.model.head_module)
    two = input_fingerprint(model, enc, 2, cfg.model.head_module)

    # Assert: the mean of each text's pooled encoder output with no adapter at all, computed
    # here by hand from the base model's hidden states.
    base = model.model.get_base_model()
    with torch.no_grad(), model.model.disable_adapter():
        pooled = []
        for text in texts:
            batch = tok([text], return_tensors="pt")
            hidden = base.encoder(**batch).last_hidden_state[0]  # type: ignore[operator]
            pooled.append(hidden.mean(0))
    expected = torch.stack(pooled).mean(0).numpy()
    assert one.shape == (int(base.config.hidden_size),)  # type: ignore[union-attr,arg-type]
    assert_allclose(one, expected, rtol=1e-4, atol=1e-5)
    assert_allclose(two, expected, rtol=1e-4, atol=1e-5)
