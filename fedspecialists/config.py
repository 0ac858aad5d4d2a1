"""Experiment configuration: Hydra composition of ``conf/`` checked against a typed schema.

``conf/`` is the single source of every experiment setting. :func:`load_config` composes it with
Hydra (the same files a sweep uses), merges the result into the structured schema below so that an
unknown key or a wrong type is refused with the key named, then checks value ranges.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

TASK_KINDS = ("text_classification", "image_classification", "causal_lm")
TASK_SOURCES = ("builtin", "hub", "files")
ADAPTER_METHODS = ("fltac", "fedit", "oracle", "local")
MOE_METHODS = ("fedmoe_da", "fedavg_moe", "fedavg_dense", "local_moe")
PROXIES = ("gate", "gate_update", "routed_mean")  # what stands for an expert in FedMoE-DA's Eq. 8
METHODS = ADAPTER_METHODS + MOE_METHODS


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range (the key is named)."""


@dataclass
class TaskSpec:
    """One task of a suite: where its data comes from and how to read it.

    ``source`` selects the loader: ``builtin`` (data shipped in packages, ``builtin`` names it),
    ``hub`` (``datasets.load_dataset(path, subset)``; ``path`` may be a local dataset folder)
    or ``files`` (local CSV / JSON lines / Parquet files named in ``data_files``).
    """

    name: str = MISSING
    kind: str = "text_classification"
    source: str = "builtin"
    builtin: str | None = None
    path: str | None = None
    subset: str | None = None
    data_files: dict[str, str] = field(default_factory=dict)
    train_split: str = "train"
    test_split: str | None = "test"
    test_fraction: float = 0.2
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    # The classes, in id order. Optional, except where sites bring their own files: then every
    # site encodes labels the same way, and the server needs no data to size the heads.
    label_names: list[str] | None = None
    # Keep only the examples of these classes (label ids in this order): cuts a smaller task out
    # of a larger source, e.g. tweets positive vs negative out of three-way tweet sentiment.
    keep_classes: list[str] | None = None
    image_column: str = "image"
    # (C, H, W) for the mixture-of-experts models: images are converted to C channels (1 grey,
    # 3 RGB) and resized to H x W. Needed where sites bring their own images, so every site feeds
    # the model one shape and the server builds the model without data.
    image_shape: list[int] | None = None
    prompt_columns: list[str] = field(default_factory=lambda: ["instruction", "context"])
    response_column: str = "response"
    filter_column: str | None = None
    filter_value: str | None = None
    max_train_examples: int | None = None
    max_test_examples: int | None = None


@dataclass
class SuiteConfig:
    name: str = MISSING
    tasks: list[TaskSpec] = field(default_factory=list)


@dataclass
class ModelConfig:
    """Base model. ``builtin:all-MiniLM-L6-v2`` resolves to the copy shipped in a package."""

    name_or_path: str = "builtin:all-MiniLM-L6-v2"
    pretrained: bool = True
    tokenizer: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    head_module: str = "classifier"
    pooling: str = "cls"
    max_length: int = 64
    image_size: int | None = None


@dataclass
class LoraSettings:
    rank: int = 1
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None


@dataclass
class TrainSettings:
    optimizer: str = "adamw"
    momentum: float = 0.9
    local_epochs: float = 1.0
    local_steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    num_threads: int = 0
    device: str = "auto"


@dataclass
class MethodConfig:
    """Which strategy runs, and how clients hold adapters (one per task, or one shared)."""

    name: str = "fltac"
    adapters: str = "per_task"


@dataclass
class FLTACConfig:
    """Settings of ``TaskAdapterClustering``.

    ``num_clusters``: ``null`` = number of tasks in the suite (the paper), an int, or ``auto``
    (silhouette over ``auto_k_min..auto_k_max``).
    """

    num_clusters: Any = None
    auto_k_min: int = 2
    auto_k_max: int = 8
    clustering: str = "constrained_kmeans"
    feature_source: str = "cumulative"
    feature_tensors: str = "head"
    normalize: bool = True
    weighting: str = "uniform"
    kmeans_n_init: int = 10
    input_fingerprint: bool = True
    source_check: bool = True
    source_check_llr: float = 4.6
    split_by_label_count: bool = True


@dataclass
class MoESettings:
    """The mixture-of-experts model (FedMoE-DA and its baselines).

    Images: a CNN backbone (``channels`` per conv block, then average pooling to
    ``pooled_size``^2). Text: a frozen encoder (``model``) whose pooled features pass a trainable
    projection to ``projection_dim``. Then a gate and ``num_experts`` two-layer MLP experts of
    width ``expert_hidden`` with top-``top_k`` routing. The dense baseline's head has
    ``dense_hidden`` units (null = num_experts * expert_hidden, a model of similar size).
    """

    channels: list[int] = field(default_factory=lambda: [16, 32])
    pooled_size: int = 4
    projection_dim: int = 256
    num_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 128
    dense_hidden: int | None = None
    load_balance_coef: float = 0.01
    global_test_per_domain: int = 250


@dataclass
class FedMoEDASettings:
    """FedMoE-DA's aggregation: P peers per expert (Eq. 9), temperature tau (Eq. 10), and the
    aggregation matrix recomputed every ``interval`` (I) rounds."""

    num_peers: int = 5
    tau: float = 1.0
    interval: int = 1
    self_weight: float = 0.0  # share of itself each expert keeps when mixed (A' = sI + (1-s)A)
    mix_every: int = 3  # experts are mixed every this many rounds (from round 2)
    proxy: str = "gate_update"  # gate | gate_update | routed_mean: what the server compares (Eq. 8)
    mix_within_client: bool = True  # an expert may be matched with its own client's experts


@dataclass
class PeerSettings:
    """Peer-to-peer expert exchange. ``transport: local`` = node folders under ``root`` (null =
    ``<run folder>/nodes``), read directly by peers (simulation)."""

    transport: str = "local"
    root: str | None = None
    max_bytes: int = 16_000_000
    timeout_s: float = 10.0
    grant_ttl_s: float = 900.0
    half_precision: bool = True  # experts travel between peers as float16
    fetch_changed_only: bool = True  # a peer expert already held (same hash) is not fetched again


@dataclass
class FederationConfig:
    num_clients: int = 10
    fraction_train: float = 1.0
    min_replies: int = 1
    node_wait_s: float = 60.0
    reply_timeout_s: float = 3600.0


@dataclass
class PartitionConfig:
    """Text suites (FL-TAC): each task split across clients by Dirichlet(``alpha``), shares under
    ``min_share`` dropped. Domain suites (MoE): each client draws a Dirichlet(``domain_alpha``)
    mixture of domains and Dirichlet(``alpha``) labels inside each, ``train_per_client`` and
    ``test_per_client`` examples."""

    alpha: float = 0.5
    min_share: float = 0.01
    domain_alpha: float = 0.5
    train_per_client: int | None = None
    test_per_client: int | None = None


@dataclass
class ValidationConfig:
    max_abs_value: float = 1.0e4
    max_update_norm: float | None = None


@dataclass
class OutputConfig:
    root: str = "${oc.env:HOME}/fedspecialists-runs"
    name: str | None = None
    plots: bool = True
    save_adapters: bool = True


@dataclass
class DataSettings:
    cache_dir: str = "${oc.env:FEDSPECIALISTS_CACHE,${oc.env:HOME}/.cache/fedspecialists}"


@dataclass
class ExperimentConfig:
    seed: int = 0
    num_rounds: int = 6
    report_true_tasks: bool = True
    method: MethodConfig = field(default_factory=MethodConfig)
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    fltac: FLTACConfig = field(default_factory=FLTACConfig)
    moe: MoESettings = field(default_factory=MoESettings)
    fedmoe_da: FedMoEDASettings = field(default_factory=FedMoEDASettings)
    peer: PeerSettings = field(default_factory=PeerSettings)
    federation: FederationConfig = field(default_factory=FederationConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    data: DataSettings = field(default_factory=DataSettings)


def parse_overrides(overrides: str | list[str] | None) -> list[str]:
    """Split a run-config overrides string (``"method=fedit seed=1"``) into Hydra overrides."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return shlex.split(overrides)
    return list(overrides)


def _compose(overrides: list[str], config_name: str) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        # A context manager: Ray actors are reused and GlobalHydra is a process singleton.
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    except HydraException as exc:
        raise ConfigError(f"invalid configuration override: {exc}") from exc


def apply_schema(cfg: DictConfig | dict[str, Any]) -> DictConfig:
    """Merge ``cfg`` into the typed schema; unknown keys and wrong types raise ``ConfigError``."""
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {exc.msg if hasattr(exc, 'msg') else exc}") from exc
    assert isinstance(merged, DictConfig)
    validate(merged)
    return merged


def load_config(
    overrides: str | list[str] | None = None, config_name: str = "config"
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides, type-check and range-check it."""
    return apply_schema(_compose(parse_overrides(overrides), config_name))


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def validate(cfg: DictConfig) -> None:
    """Range checks the type system cannot express. Raises ``ConfigError`` naming the key."""
    _check(cfg.seed >= 0, "seed", "must be >= 0")
    _check(cfg.num_rounds >= 1, "num_rounds", "must be >= 1")
    _check(cfg.method.name in METHODS, "method.name", f"must be one of {METHODS}")
    _check(
        cfg.method.adapters in ("per_task", "shared"),
        "method.adapters",
        "must be 'per_task' or 'shared'",
    )
    _check(len(cfg.suite.tasks) >= 1, "suite.tasks", "needs at least one task")
    names = [t.name for t in cfg.suite.tasks]
    _check(len(set(names)) == len(names), "suite.tasks", f"task names must be unique: {names}")
    for i, task in enumerate(cfg.suite.tasks):
        key = f"suite.tasks[{i}]"
        _check(task.kind in TASK_KINDS, f"{key}.kind", f"must be one of {TASK_KINDS}")
        _check(task.source in TASK_SOURCES, f"{key}.source", f"must be one of {TASK_SOURCES}")
        if task.source == "builtin":
            _check(task.builtin is not None, f"{key}.builtin", "required when source=builtin")
        if task.source == "hub":
            _check(task.path is not None, f"{key}.path", "required when source=hub")
        if task.source == "files":
            _check("train" in task.data_files, f"{key}.data_files", "needs a 'train' file")
        _check(0.0 < task.test_fraction < 1.0, f"{key}.test_fraction", "must be in (0, 1)")
        if task.keep_classes is not None:
            _check(
                len(task.keep_classes) >= 2
                and len(set(task.keep_classes)) == len(task.keep_classes),
                f"{key}.keep_classes",
                "must list at least two distinct classes",
            )
        if task.image_shape is not None:
            shape = list(task.image_shape)
            _check(
                len(shape) == 3 and shape[0] in (1, 3) and all(v >= 1 for v in shape),
                f"{key}.image_shape",
                "must be [C, H, W] with C 1 (grey) or 3 (RGB) and H, W >= 1",
            )
        for limit in ("max_train_examples", "max_test_examples"):
            value = task[limit]
            _check(value is None or value >= 1, f"{key}.{limit}", "must be >= 1 or null")
    _check(cfg.model.pooling in ("cls", "mean"), "model.pooling", "must be 'cls' or 'mean'")
    _check(cfg.model.max_length >= 8, "model.max_length", "must be >= 8")
    _check(cfg.lora.rank >= 1, "lora.rank", "must be >= 1")
    _check(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    _check(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    _check(cfg.train.local_epochs > 0, "train.local_epochs", "must be > 0")
    _check(
        cfg.train.local_steps is None or cfg.train.local_steps >= 1,
        "train.local_steps",
        "must be >= 1 or null",
    )
    _check(cfg.train.optimizer in ("adamw", "sgd"), "train.optimizer", "must be 'adamw' or 'sgd'")
    _check(0.0 <= cfg.train.momentum < 1.0, "train.momentum", "must be in [0, 1)")
    _check(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(cfg.train.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    _check(cfg.train.lr > 0, "train.lr", "must be > 0")
    _check(cfg.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(cfg.train.num_threads >= 0, "train.num_threads", "must be >= 0 (0 = all cores)")
    _check(
        cfg.train.device in ("auto", "cpu", "mps") or str(cfg.train.device).startswith("cuda"),
        "train.device",
        "must be auto, cpu, mps, cuda or cuda:<index>",
    )
    k = cfg.fltac.num_clusters
    _check(
        k is None or k == "auto" or (isinstance(k, int) and not isinstance(k, bool) and k >= 1),
        "fltac.num_clusters",
        "must be null (= number of tasks), 'auto' or an int >= 1",
    )
    _check(cfg.fltac.auto_k_min >= 2, "fltac.auto_k_min", "must be >= 2")
    _check(
        cfg.fltac.auto_k_max >= cfg.fltac.auto_k_min, "fltac.auto_k_max", "must be >= auto_k_min"
    )
    _check(
        cfg.fltac.clustering in ("kmeans", "constrained_kmeans"),
        "fltac.clustering",
        "must be 'kmeans' or 'constrained_kmeans'",
    )
    _check(
        cfg.fltac.feature_source in ("update", "cumulative", "weights", "cumulative+update"),
        "fltac.feature_source",
        "must be 'update', 'cumulative', 'weights' or 'cumulative+update'",
    )
    _check(
        cfg.fltac.feature_tensors in ("all", "lora", "head"),
        "fltac.feature_tensors",
        "must be one of all, lora, head",
    )
    _check(
        cfg.fltac.weighting in ("uniform", "samples"),
        "fltac.weighting",
        "must be 'uniform' or 'samples'",
    )
    _check(cfg.fltac.kmeans_n_init >= 1, "fltac.kmeans_n_init", "must be >= 1")
    _check(cfg.fltac.source_check_llr > 0, "fltac.source_check_llr", "must be > 0")
    _check(cfg.federation.num_clients >= 1, "federation.num_clients", "must be >= 1")
    _check(
        0.0 < cfg.federation.fraction_train <= 1.0,
        "federation.fraction_train",
        "must be in (0, 1]",
    )
    _check(cfg.federation.min_replies >= 1, "federation.min_replies", "must be >= 1")
    _check(cfg.federation.node_wait_s >= 0, "federation.node_wait_s", "must be >= 0")
    _check(cfg.federation.reply_timeout_s > 0, "federation.reply_timeout_s", "must be > 0")
    _check(cfg.partition.alpha > 0, "partition.alpha", "must be > 0")
    _check(0.0 <= cfg.partition.min_share < 1.0, "partition.min_share", "must be in [0, 1)")
    _check(cfg.validation.max_abs_value > 0, "validation.max_abs_value", "must be > 0")
    mun = cfg.validation.max_update_norm
    _check(mun is None or mun > 0, "validation.max_update_norm", "must be > 0 or null")
    _check(cfg.partition.domain_alpha > 0, "partition.domain_alpha", "must be > 0")
    for key in ("train_per_client", "test_per_client"):
        value = cfg.partition[key]
        _check(value is None or value >= 1, f"partition.{key}", "must be >= 1 or null")
    moe = cfg.moe
    _check(len(moe.channels) >= 1 and min(moe.channels) >= 1, "moe.channels", "needs widths >= 1")
    _check(moe.pooled_size >= 1, "moe.pooled_size", "must be >= 1")
    _check(moe.projection_dim >= 1, "moe.projection_dim", "must be >= 1")
    _check(moe.num_experts >= 1, "moe.num_experts", "must be >= 1")
    _check(1 <= moe.top_k <= moe.num_experts, "moe.top_k", "must be in 1..moe.num_experts")
    _check(moe.expert_hidden >= 1, "moe.expert_hidden", "must be >= 1")
    _check(moe.dense_hidden is None or moe.dense_hidden >= 1, "moe.dense_hidden", "must be >= 1")
    _check(moe.load_balance_coef >= 0, "moe.load_balance_coef", "must be >= 0")
    _check(moe.global_test_per_domain >= 1, "moe.global_test_per_domain", "must be >= 1")
    _check(cfg.fedmoe_da.num_peers >= 0, "fedmoe_da.num_peers", "P must be >= 0")
    _check(cfg.fedmoe_da.tau > 0, "fedmoe_da.tau", "tau must be > 0")
    _check(cfg.fedmoe_da.interval >= 1, "fedmoe_da.interval", "I must be >= 1")
    _check(0.0 <= cfg.fedmoe_da.self_weight <= 1.0, "fedmoe_da.self_weight", "must be in [0, 1]")
    _check(cfg.fedmoe_da.mix_every >= 1, "fedmoe_da.mix_every", "must be >= 1")
    _check(
        cfg.fedmoe_da.proxy in PROXIES,
        "fedmoe_da.proxy",
        f"must be one of {', '.join(PROXIES)}",
    )
    _check(cfg.peer.transport in ("local",), "peer.transport", "must be 'local'")
    _check(cfg.peer.max_bytes >= 1, "peer.max_bytes", "must be >= 1")
    _check(cfg.peer.timeout_s > 0, "peer.timeout_s", "must be > 0")
    _check(cfg.peer.grant_ttl_s > 0, "peer.grant_ttl_s", "must be > 0")
    if cfg.method.name in MOE_METHODS:
        for key in ("train_per_client", "test_per_client"):
            _check(
                cfg.partition[key] is not None,
                f"partition.{key}",
                f"required by the mixture-of-experts method {cfg.method.name}",
            )
        kinds = {t.kind for t in cfg.suite.tasks}
        _check(
            kinds in ({"image_classification"}, {"text_classification"}),
            "suite.tasks",
            "a mixture-of-experts suite needs all-image or all-text classification tasks",
        )
    if cfg.method.name == "oracle":
        _check(cfg.report_true_tasks, "report_true_tasks", "the oracle baseline needs true tasks")


def num_clusters(cfg: DictConfig) -> int | str:
    """K for FL-TAC: the configured value, or the number of tasks when unset (the paper)."""
    k = cfg.fltac.num_clusters
    return len(cfg.suite.tasks) if k is None else k


def to_yaml(cfg: DictConfig | ListConfig) -> str:
    return OmegaConf.to_yaml(cfg)


_SPEC_FIELDS = tuple(f.name for f in fields(TaskSpec))


def as_task_spec(spec: Any) -> TaskSpec:
    """Turn a task config (``TaskSpec``, OmegaConf ``DictConfig`` or mapping) into a ``TaskSpec``.

    Keys missing from a mapping take ``TaskSpec``'s defaults, so tests can pass small dicts.

    Raises
    ------
    ValueError
        On an unknown key or a missing ``name``.
    """
    if isinstance(spec, TaskSpec):
        return spec
    values: dict[str, Any]
    if isinstance(spec, DictConfig):
        container = OmegaConf.to_container(spec, resolve=True)
        assert isinstance(container, dict)
        values = {str(k): v for k, v in container.items()}
    elif isinstance(spec, Mapping):
        values = {str(k): _plain(v) for k, v in spec.items()}
    else:
        values = {f: getattr(spec, f) for f in _SPEC_FIELDS if hasattr(spec, f)}
    unknown = sorted(set(values) - set(_SPEC_FIELDS))
    if unknown:
        raise ValueError(f"unknown task config key(s) {unknown}; known: {list(_SPEC_FIELDS)}")
    name = values.get("name")
    if not isinstance(name, str) or not name or name == "???":
        raise ValueError(f"task config needs a 'name': {values}")
    return TaskSpec(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def steps_per_round(
    train_cfg: Any, examples: int, batch_size: int, rounding: Callable[[float], int] = math.ceil
) -> int:
    """Optimiser steps in one round: ``train.local_steps`` if set, else epochs over the data.

    ``rounding`` turns the epochs' fractional steps into a count (the adapter methods use
    ``ceil``, the MoE methods ``round``; issue 11 is to make them one).
    """
    if train_cfg.local_steps:
        return int(train_cfg.local_steps)
    return max(1, int(rounding(train_cfg.local_epochs * examples / batch_size)))
