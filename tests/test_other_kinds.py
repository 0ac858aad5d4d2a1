"""The hub settings' code paths (ViT image classification, causal-LM instruction tuning) on small
local stand-ins: randomly initialised tiny models built from a config and data written to tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from sklearn.datasets import load_digits

from client_app.fltac_training import encode, evaluate_adapter, train_adapter
from fedspecialists.config import AdapterRunConfig, apply_schema, as_schema, compose_config
from fedspecialists.data.tasks import client_tasks, load_suite
from fedspecialists.models.lora import build_preprocessor, get_adapter_model, initial_adapter

# The model keys a test's model does not set (the schema's defaults before conf/ held them all).
MODEL_BASE: dict[str, Any] = {
    "tokenizer": None,
    "config_overrides": {},
    "head_module": "classifier",
    "pooling": "cls",
    "max_length": 64,
    "image_size": None,
}


def _cfg(tmp_path: Path, suite: dict[str, Any], model: dict[str, Any]) -> AdapterRunConfig:
    """The default config (conf/) with this suite and this model in place of its own."""
    base = compose_config()
    base.suite, base.model = suite, {**MODEL_BASE, **model}
    overrides = {
        "train": {"local_epochs": 1.0, "batch_size": 8, "lr": 1e-3},
        "federation": {"num_clients": 2},
        "data": {"cache_dir": str(tmp_path / "cache")},
        "lora": {"rank": 2, "alpha": 4.0},
    }
    merged = OmegaConf.merge(base, overrides)
    assert isinstance(merged, DictConfig)
    return as_schema(apply_schema(merged), AdapterRunConfig)


def _train_and_evaluate(cfg: AdapterRunConfig) -> tuple[float, int, int]:
    tasks = load_suite(cfg.suite.tasks, cfg.seed, cfg.data.cache_dir)
    num_labels = max(t.num_labels for t in tasks)
    adapters = get_adapter_model(cfg, num_labels)
    adapters.load("slot0", initial_adapter(cfg, num_labels))
    preprocessor = build_preprocessor(cfg.model, tasks[0].kind)
    task = client_tasks(tasks, 0, 2, 0.5, 0.0, cfg.seed)[0]
    loss, steps = train_adapter(
        adapters, "slot0", encode(task, "train", preprocessor, cfg.model.max_length), cfg.train, 0
    )
    correct, total, _ = evaluate_adapter(
        adapters, "slot0", encode(task, "test", preprocessor, cfg.model.max_length), 16
    )
    assert np.isfinite(loss) and steps >= 1
    return loss, correct, total


def test_vit_image_classification_on_local_images(tmp_path: Path) -> None:
    digits = load_digits()
    images = [
        Image.fromarray((x.reshape(8, 8) * 16).astype(np.uint8)).resize((28, 28))
        for x in digits.data[:80]
    ]
    folder = tmp_path / "digits"
    folder.mkdir()
    ds = datasets.Dataset.from_dict({"img": images, "label": digits.target[:80].tolist()})
    ds.cast_column("img", datasets.Image()).to_parquet(str(folder / "train.parquet"))
    cfg = _cfg(
        tmp_path,
        {
            "name": "digits",
            "tasks": [
                {
                    "name": "digits",
                    "kind": "image_classification",
                    "source": "hub",
                    "path": str(folder),
                    "image_column": "img",
                    "test_split": None,
                }
            ],
        },
        {
            "name_or_path": "config:vit",
            "pretrained": False,
            "image_size": 28,
            "config_overrides": {
                "image_size": 28,
                "patch_size": 7,
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            },
        },
    )
    _, correct, total = _train_and_evaluate(cfg)
    assert total > 0 and 0 <= correct <= total


def test_causal_lm_on_local_instructions(tmp_path: Path) -> None:
    rows = [
        {
            "instruction": f"Name a colour number {i}.",
            "context": "" if i % 2 else "Colours of the rainbow.",
            "response": ["red", "green", "blue"][i % 3],
            "category": "brainstorming" if i % 4 else "open_qa",
        }
        for i in range(60)
    ]
    path = tmp_path / "dolly.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _cfg(
        tmp_path,
        {
            "name": "dolly_standin",
            "tasks": [
                {
                    "name": "brainstorming",
                    "kind": "causal_lm",
                    "source": "files",
                    "data_files": {"train": str(path)},
                    "filter_column": "category",
                    "filter_value": "brainstorming",
                }
            ],
        },
        {
            "name_or_path": "config:gpt2",
            "pretrained": False,
            "tokenizer": "builtin:all-MiniLM-L6-v2",  # any tokenizer works for a random model
            "head_module": "lm_head",
            "max_length": 48,
            "config_overrides": {
                "n_layer": 1,
                "n_embd": 32,
                "n_head": 2,
                "vocab_size": 30522,
            },
        },
    )
    _, correct, total = _train_and_evaluate(cfg)
    assert total > 0 and 0 <= correct <= total  # next-token accuracy counts response tokens


@pytest.mark.parametrize("suite", ["glue", "cifar", "dolly"])
def test_paper_settings_name_hub_data(suite: str) -> None:
    from fedspecialists.config import load_config

    cfg = load_config(f"suite={suite}")
    assert all(t.source == "hub" and t.path for t in cfg.suite.tasks)
