"""A node's FL-TAC examples cached on the site's disk (``client_app.fltac_data``): read back
equal to the encoding itself, without importing the data-loading stack, rebuilt when damaged,
and keyed by everything they depend on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from client_app import fltac_data
from client_app.fltac_data import (
    NodeExamples,
    TaskExamples,
    build_examples,
    cache_key,
    load_examples,
    node_examples,
    save_examples,
)
from client_app.fltac_training import Encoded
from fedspecialists.config import AdapterRunConfig, load_config_as
from fedspecialists.models.lora import build_preprocessor

ROOT = Path(__file__).resolve().parents[1]


def _cfg(cache: Path, extra: str = "") -> AdapterRunConfig:
    """The tiny suite, with a cache folder of its own that sees the fetched data carriers."""
    from fedspecialists.data.tasks import default_cache_dir

    for carrier in ("wheels", "npm"):
        link = cache / carrier
        if not link.exists() and (default_cache_dir() / carrier).exists():
            link.symlink_to(default_cache_dir() / carrier)
    return load_config_as(
        AdapterRunConfig, f"model=tiny_bert suite=tiny_text data.cache_dir={cache} {extra}"
    )


def _prep(cfg: AdapterRunConfig) -> object:
    return build_preprocessor(cfg.model, "text_classification")


def _assert_same(a: NodeExamples, b: NodeExamples) -> None:
    assert a.suite_label_counts == b.suite_label_counts
    assert [(t.name, t.kind, t.num_labels) for t in a.tasks] == [
        (t.name, t.kind, t.num_labels) for t in b.tasks
    ]
    for x, y in zip(a.tasks, b.tasks, strict=True):
        for split in ("train", "test"):
            ex, ey = getattr(x, split), getattr(y, split)
            assert [dict(r) for r in ex.inputs] == [dict(r) for r in ey.inputs]
            assert torch.equal(ex.labels, ey.labels) and ex.labels.dtype == ey.labels.dtype
            assert torch.equal(ex.num_labels, ey.num_labels)
            assert ex.tasks == ey.tasks and ex.kind == ey.kind
            assert ex.pad_token_id == ey.pad_token_id


def test_cached_examples_equal_the_encoding_and_are_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path)
    built = build_examples(cfg, (1, 3), None, lambda: _prep(cfg))
    assert len(built.tasks) >= 1 and built.suite_label_counts == [5, 3, 2]
    first = node_examples(cfg, (1, 3), None, lambda: _prep(cfg))  # a miss: builds and writes
    files = list((tmp_path / "encoded").glob("*.safetensors"))
    assert [f.name for f in files] == [f"{cache_key(cfg, (1, 3), None)}.safetensors"]

    def no_build(*args: object) -> NodeExamples:
        raise AssertionError("a cache hit must not build")

    monkeypatch.setattr(fltac_data, "build_examples", no_build)
    again = node_examples(cfg, (1, 3), None, lambda: _prep(cfg))
    _assert_same(built, first)
    _assert_same(built, again)
    off = _cfg(tmp_path, "data.cache_encoded=false")  # off: always built, nothing read
    with pytest.raises(AssertionError, match="must not build"):
        node_examples(off, (1, 3), None, lambda: _prep(off))


def test_a_hit_never_imports_the_data_loading_stack(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    node_examples(cfg, (0, 3), None, lambda: _prep(cfg))
    script = (
        "import sys\n"
        "from client_app.fltac_data import node_examples\n"
        "from fedspecialists.config import AdapterRunConfig, load_config_as\n"
        f"cfg = load_config_as(AdapterRunConfig, 'model=tiny_bert suite=tiny_text "
        f"data.cache_dir={tmp_path}')\n"
        "ex = node_examples(cfg, (0, 3), None, lambda: 1 / 0)\n"  # no tokenizer either
        "print(len(ex.tasks), sorted(m for m in ('datasets', 'pandas', 'sklearn') "
        "if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split("\n")[0].endswith("[]"), out.stdout + out.stderr


def test_a_damaged_file_is_encoded_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(tmp_path)
    built = node_examples(cfg, (2, 3), None, lambda: _prep(cfg))
    path = tmp_path / "encoded" / f"{cache_key(cfg, (2, 3), None)}.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # cut short, as by a crash of another writer
    assert load_examples(path) is None
    again = node_examples(cfg, (2, 3), None, lambda: _prep(cfg))
    _assert_same(built, again)
    assert load_examples(path) is not None  # rewritten whole


def test_the_key_changes_with_what_the_examples_depend_on(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    key = cache_key(cfg, (0, 3), None)
    assert cache_key(cfg, (0, 3), None) == key  # stable
    assert cache_key(cfg, (1, 3), None) != key
    assert cache_key(cfg, (0, 4), None) != key
    assert cache_key(_cfg(tmp_path, "seed=1"), (0, 3), None) != key
    assert cache_key(_cfg(tmp_path, "partition.alpha=0.3"), (0, 3), None) != key
    assert cache_key(_cfg(tmp_path, "model.max_length=17"), (0, 3), None) != key
    site = tmp_path / "site"
    site.mkdir()
    (site / "a.csv").write_text("text,label\nx,0\n")
    with_site = cache_key(cfg, (0, 1), str(site))
    (site / "a.csv").write_text("text,label\nx,0\ny,1\n")  # a site's file changed
    assert cache_key(cfg, (0, 1), str(site)) != with_site


def test_stacked_ragged_and_empty_inputs_round_trip(tmp_path: Path) -> None:
    # By hand: one image task (pixel tensors of one shape), one text task with token lists
    # of lengths 3, 1 and 0, and an empty test split.
    pixels = Encoded(
        inputs=[{"pixel_values": torch.full((3, 2, 2), float(i))} for i in range(2)],
        labels=torch.tensor([1, 0]),
        num_labels=torch.tensor([2, 2]),
        tasks=["img", "img"],
        kind="image_classification",
    )
    tokens = Encoded(
        inputs=[{"input_ids": [5, 6, 7]}, {"input_ids": [8]}, {"input_ids": []}],
        labels=torch.tensor([0, 2, 1]),
        num_labels=torch.tensor([3, 3, 3]),
        tasks=["txt"] * 3,
        kind="text_classification",
        pad_token_id=9,
    )
    empty = Encoded([], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), [], "")
    examples = NodeExamples(
        [
            TaskExamples("img", "image_classification", 2, pixels, pixels),
            TaskExamples("txt", "text_classification", 3, tokens, empty),
        ],
        [2, 3],
    )
    path = tmp_path / "x.safetensors"
    save_examples(path, examples)
    back = load_examples(path)
    assert back is not None
    img, txt = back.tasks
    assert torch.equal(img.train.inputs[1]["pixel_values"], torch.full((3, 2, 2), 1.0))
    assert [r["input_ids"] for r in txt.train.inputs] == [[5, 6, 7], [8], []]
    assert txt.train.pad_token_id == 9 and txt.train.tasks == ["txt"] * 3
    assert np.array_equal(txt.train.num_labels.numpy(), [3, 3, 3])
    assert len(txt.test) == 0 and txt.test.labels.shape == (0,)
