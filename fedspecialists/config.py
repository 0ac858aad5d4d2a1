"""Experiment configuration: Hydra composition of ``conf/`` checked against a typed schema.

``conf/`` is the single source of every experiment setting. :func:`load_config` composes it with
Hydra (the same files a sweep uses), merges the result into the structured schema below so that an
unknown key or a wrong type is refused with the key named, then checks value ranges.
"""

from __future__ import annotations

import math
import shlex
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedspecialists import methods

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

TASK_KINDS = ("text_classification", "image_classification", "causal_lm")
TASK_SOURCES = ("builtin", "hub", "files")
PRIVATE_MODES = ("routed", "paired")  # how moe.private_experts are used


def routed_experts(num_experts: int, private_experts: int, private_mode: str) -> int:
    """How many experts the gate routes over: K, plus K_p when the private ones are routed."""
    return num_experts + (private_experts if private_mode == "routed" else 0)


# what stands for an expert in FedMoE-DA's Eq. 8
PROXIES = ("gate", "gate_update", "routed_mean", "declared_domains", "output_update")
ROBUST_RULES = ("mean", "median", "trimmed_mean")  # strategies.robust
ROBUST_KEYS = (  # robust.*
    "rule",
    "trim_fraction",
    "clip_norm",
    "clip_to_median_norm",
    "clip_outlier_norms",
    "clip_outlier_norms_for_steps",
    "drop_opposed_updates",
    "drop_opposed_scope",
)
FAULT_KINDS = (  # client_app.faults
    "none",
    "crash",
    "hang",
    "nan",
    "inf",
    "shape",
    "huge_norm",
    "sign_flip",
    "scale",
    "other_task",
    "absent",
)
FLTAC_CHOICES = {
    "clustering": ("kmeans", "constrained_kmeans"),
    "feature_source": ("update", "cumulative", "weights", "cumulative+update"),
    "feature_tensors": ("all", "lora", "head"),
    "weighting": ("uniform", "samples"),
    "kmeans_weighting": ("uniform", "samples"),
}


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range (the key is named)."""


Rule = tuple[Callable[[Any], bool], str]  # (is the value allowed?, what is allowed)


def _one_of(allowed: Sequence[str]) -> Rule:
    return (lambda value: value in allowed), f"must be one of {', '.join(allowed)}"


def _is_num_clusters(value: Any) -> bool:
    if value is None or value == "auto":
        return True
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# The range of every setting a strategy also takes as a constructor argument, in one place: the
# config's validation checks it naming the key, and so do the strategies' constructors and maths
# (usable without a config) through check_setting.
SETTING_RULES: dict[str, Rule] = {
    "federation.fraction_train": ((lambda v: 0.0 < v <= 1.0), "must be in (0, 1]"),
    "federation.min_replies": ((lambda v: v >= 1), "must be >= 1"),
    "robust.rule": _one_of(ROBUST_RULES),
    "robust.trim_fraction": ((lambda v: 0.0 <= v < 0.5), "must be in [0, 0.5)"),
    "robust.clip_norm": ((lambda v: v is None or v > 0), "must be > 0 or null"),
    "robust.clip_to_median_norm": ((lambda v: isinstance(v, bool)), "must be true or false"),
    "robust.clip_outlier_norms": ((lambda v: isinstance(v, bool)), "must be true or false"),
    "robust.clip_outlier_norms_for_steps": (
        (lambda v: isinstance(v, bool)),
        "must be true or false",
    ),
    "robust.drop_opposed_updates": ((lambda v: isinstance(v, bool)), "must be true or false"),
    "robust.drop_opposed_scope": _one_of(("update", "node")),
    "fltac.num_clusters": (
        _is_num_clusters,
        "must be null (= number of tasks), 'auto' or >= 1",
    ),
    **{f"fltac.{key}": _one_of(allowed) for key, allowed in FLTAC_CHOICES.items()},
    "fltac.source_check_llr": ((lambda v: v > 0), "must be > 0"),
    "fedmoe_da.num_peers": ((lambda v: v >= 0), "P must be >= 0"),
    "fedmoe_da.tau": ((lambda v: v > 0), "tau must be > 0"),
    "fedmoe_da.self_weight": ((lambda v: 0.0 <= v <= 1.0), "must be in [0, 1]"),
    "fedmoe_da.interval": ((lambda v: v >= 1), "I must be >= 1"),
    "fedmoe_da.mix_every": ((lambda v: v >= 1), "must be >= 1"),
    "fedmoe_da.pool_max_age": ((lambda v: v >= 1), "must be >= 1"),
    "fedmoe_da.prox_mu": ((lambda v: v >= 0), "must be >= 0"),
}


def check_setting(key: str, value: Any) -> None:
    """Refuse ``value`` outside the range of setting ``key`` (:data:`SETTING_RULES`).

    Raises
    ------
    ConfigError
        Naming the key, the allowed range and the value.
    """
    allowed, rule = SETTING_RULES[key]
    if not allowed(value):
        raise ConfigError(f"config key '{key}': {rule}, not {value!r}")


def check_section(section: str, values: object, keys: Sequence[str]) -> None:
    """:func:`check_setting` for each of ``keys``, read as attributes of ``values``."""
    for key in keys:
        check_setting(f"{section}.{key}", getattr(values, key))


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
    # Mixture-of-experts domains only: class i of the source becomes label label_map[i] (a
    # permutation). Two domains on one source with different maps disagree on what the same
    # input means (concept shift), which one shared model cannot fit for both.
    label_map: list[int] | None = None
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

    name_or_path: str = MISSING
    pretrained: bool = MISSING
    tokenizer: str | None = MISSING
    config_overrides: dict[str, Any] = MISSING
    head_module: str = MISSING
    pooling: str = MISSING
    max_length: int = MISSING
    image_size: int | None = MISSING


@dataclass
class LoraSettings:
    rank: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: list[str] | None = MISSING


@dataclass
class TrainSettings:
    optimizer: str = MISSING
    momentum: float = MISSING
    local_epochs: float = MISSING
    local_steps: int | None = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    eval_batch_size: int = MISSING
    num_threads: int = MISSING
    device: str = MISSING


@dataclass
class MethodConfig:
    """Which method runs (a name in :mod:`fedspecialists.methods`), and modules to import first
    that register methods of one's own (``plugins``, see ``docs/extending.md``)."""

    name: str = MISSING
    plugins: list[str] = MISSING


@dataclass
class FLTACConfig:
    """Settings of ``TaskAdapterClustering``.

    ``num_clusters``: ``null`` = number of tasks in the suite (the paper), an int, or ``auto``
    (silhouette over ``auto_k_min..auto_k_max``).
    """

    num_clusters: Any = MISSING
    auto_k_min: int = MISSING
    auto_k_max: int = MISSING
    clustering: str = MISSING
    feature_source: str = MISSING
    feature_tensors: str = MISSING
    normalize: bool = MISSING
    weighting: str = MISSING
    kmeans_weighting: str = MISSING  # how much each adapter counts in K-means
    kmeans_n_init: int = MISSING
    input_fingerprint: bool = MISSING
    label_fingerprint: bool = MISSING
    fingerprints_only_from_v0: bool = MISSING  # round 1: K-means on the fingerprints alone
    reject_label_count_mismatch: bool = MISSING  # a head that moved another task's logit count
    reorder_mismatched_adapters: bool = MISSING  # ... taken in the one order that fits instead
    refine_moves: bool = MISSING  # Hartigan's moves after constrained K-means
    source_check: bool = MISSING
    source_check_llr: float = MISSING
    split_by_label_count: bool = MISSING
    projection_dim: int = MISSING  # K-means on a random projection of the features (0 = never)
    projection_min_adapters: int = MISSING  # ... when a round pools more adapters than this


@dataclass
class MoESettings:
    """The mixture-of-experts model (FedMoE-DA and its baselines).

    Images: a CNN backbone (``channels`` per conv block, then average pooling to
    ``pooled_size``^2). Text: a frozen encoder (``model``) whose pooled features pass a trainable
    projection to ``projection_dim``. Then a gate and ``num_experts`` two-layer MLP experts of
    width ``expert_hidden`` with top-``top_k`` routing. The dense baseline's head has
    ``dense_hidden`` units (null = num_experts * expert_hidden, a model of similar size).
    ``private_experts`` more experts (copies of the first ones at the start) that stay on the
    client in every method, used as ``private_mode`` says: ``routed`` (the gate routes over all
    of them) or ``paired`` (each blended with the shared expert it copies, by a learnt share).
    """

    channels: list[int] = MISSING
    pooled_size: int = MISSING
    projection_dim: int = MISSING
    num_experts: int = MISSING
    top_k: int = MISSING
    expert_hidden: int = MISSING
    dense_hidden: int | None = MISSING
    load_balance_coef: float = MISSING
    global_test_per_domain: int = MISSING
    private_experts: int = MISSING
    private_mode: str = MISSING  # how private experts are used, one of PRIVATE_MODES


@dataclass
class FedMoEDASettings:
    """FedMoE-DA's aggregation: P peers per expert (Eq. 9), temperature tau (Eq. 10), and the
    aggregation matrix recomputed every ``interval`` (I) rounds."""

    num_peers: int = MISSING
    tau: float = MISSING
    interval: int = MISSING
    self_weight: float = MISSING  # share of itself each expert keeps when mixed (A' = sI + (1-s)A)
    mix_every: int = MISSING  # experts are mixed every this many rounds (from round 2)
    proxy: str = MISSING  # what the server compares (Eq. 8), one of PROXIES
    mix_within_client: bool = MISSING  # an expert may be matched with its own client's experts
    same_index: bool = MISSING  # an expert is matched only with other clients' experts at index k
    prox_mu: float = MISSING  # proximal term holding each expert near its mixed value in training
    pool_max_age: int = MISSING  # rounds a silent client keeps its experts in the pool


@dataclass
class PeerSettings:
    """Peer-to-peer expert exchange. In simulation, node folders under ``root`` (null =
    ``<run folder>/nodes``) that peers read directly; in a deployment, each site's gRPC endpoint."""

    root: str | None = MISSING
    max_bytes: int = MISSING
    timeout_s: float = MISSING
    grant_ttl_s: float = MISSING
    half_precision: bool = MISSING  # experts travel between peers as float16
    fetch_changed_only: bool = (
        MISSING  # a peer expert already held (same hash) is not fetched again
    )


@dataclass
class FederationConfig:
    num_clients: int = MISSING
    fraction_train: float = MISSING
    min_replies: int = MISSING
    node_wait_s: float = MISSING
    reply_timeout_s: float = MISSING
    evaluate_every: int = MISSING
    fold_evaluation: bool = MISSING  # round r's evaluation inside round r + 1's training message
    max_in_flight: int = MISSING  # messages awaiting a reply at once (0: all of a phase's)
    pack_arrays: bool = MISSING  # each ArrayRecord travels as one safetensors array


@dataclass
class PartitionConfig:
    """Text suites (FL-TAC): each task split across clients by Dirichlet(``alpha``), shares under
    ``min_share`` dropped. Domain suites (MoE): each client draws a Dirichlet(``domain_alpha``)
    mixture of domains and Dirichlet(``alpha``) labels inside each, ``train_per_client`` and
    ``test_per_client`` examples."""

    alpha: float = MISSING
    min_share: float = MISSING
    domain_alpha: float = MISSING
    train_per_client: int | None = MISSING
    test_per_client: int | None = MISSING


@dataclass
class ValidationConfig:
    max_abs_value: float = MISSING
    max_update_norm: float | None = MISSING


@dataclass
class RobustSettings:
    """How replies are aggregated where many meet: inside an FL-TAC cluster, FedMoE-DA's
    backbone (``strategies.robust``). ``rule``: mean | median | trimmed_mean."""

    rule: str = MISSING
    trim_fraction: float = MISSING
    clip_norm: float | None = MISSING
    clip_to_median_norm: bool = MISSING  # clip each update to its group's median update norm
    clip_outlier_norms: bool = MISSING  # clip only norms above median + 3 scaled MADs (Hampel)
    clip_outlier_norms_for_steps: bool = MISSING  # the same on log norms fitted on log steps
    drop_opposed_updates: bool = MISSING
    drop_opposed_scope: str = MISSING  # update | node: also the other updates of their nodes


@dataclass
class FaultSettings:
    """Faults injected on purpose (``client_app.faults``), to measure what a run survives.

    Each round, ``round(fraction * clients)`` clients drawn by seed are faulty, with ``kind``:
    crash (the ClientApp raises), hang (it sleeps past ``federation.reply_timeout_s``), nan,
    inf, shape, huge_norm (an invalid update), sign_flip, scale (finite attacks on the update),
    other_task (FL-TAC: each slot sends another slot's adapter). ``none``: no fault.
    ``absent``: no fault, the server leaves the drawn clients out of training instead (the
    clean run with the same participation as a crash run of the same seed and fraction).
    """

    kind: str = MISSING
    fraction: float = MISSING
    scale: float = MISSING  # factor of the scale attack (and of huge_norm: 1e6)
    seed: int = MISSING
    evaluate: bool = MISSING  # crash and hang strike evaluation messages too


@dataclass
class PrivacySettings:
    """Local differential privacy with Flower's ``LocalDpMod`` on every trained update:
    clipped to ``clipping_norm``, Gaussian noise of std ``sensitivity * sqrt(2 ln(1.25 /
    delta)) / epsilon``. ``local_dp: false``: off."""

    local_dp: bool = MISSING
    clipping_norm: float = MISSING
    sensitivity: float = MISSING
    epsilon: float = MISSING
    delta: float = MISSING

    def noise_std(self) -> float:
        """The std of the Gaussian noise: ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon``."""
        return self.sensitivity * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon


@dataclass
class OutputConfig:
    root: str = MISSING
    name: str | None = MISSING
    plots: bool = MISSING
    save_adapters: bool = MISSING
    tensorboard: bool = MISSING  # TensorBoard event files in <run folder>/tensorboard/


@dataclass
class DataSettings:
    cache_dir: str = MISSING
    cache_encoded: bool = MISSING  # FL-TAC: each node's encoded examples kept under cache_dir


@dataclass
class ExperimentConfig:
    """The settings every run reads; each family of methods adds its own sections below.

    Every default lives in ``conf/`` (the fields here only give types): a key missing from the
    composed config is an error that names it.
    """

    seed: int = MISSING
    num_rounds: int = MISSING
    report_true_tasks: bool = MISSING
    resume: str | None = MISSING
    method: MethodConfig = field(default_factory=MethodConfig)
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    federation: FederationConfig = field(default_factory=FederationConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    robust: RobustSettings = field(default_factory=RobustSettings)
    faults: FaultSettings = field(default_factory=FaultSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    output: OutputConfig = field(default_factory=OutputConfig)
    data: DataSettings = field(default_factory=DataSettings)


@dataclass
class AdapterRunConfig(ExperimentConfig):
    """A run of the ``adapters`` family (FL-TAC and its baselines)."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    fltac: FLTACConfig = field(default_factory=FLTACConfig)


@dataclass
class MoERunConfig(ExperimentConfig):
    """A run of the ``moe`` family (FedMoE-DA and its baselines)."""

    moe: MoESettings = field(default_factory=MoESettings)
    fedmoe_da: FedMoEDASettings = field(default_factory=FedMoEDASettings)
    peer: PeerSettings = field(default_factory=PeerSettings)


SCHEMAS: dict[str, type[ExperimentConfig]] = {"adapters": AdapterRunConfig, "moe": MoERunConfig}
# Keys no longer read: accepted (with a warning) so that old configs and commands keep working.
RETIRED_KEYS = {
    "method.adapters": "the method decides: FedIT one shared adapter, the others one per task",
    "peer.transport": "simulation uses node folders, a deployment each site's gRPC endpoint",
}


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


def apply_schema(cfg: DictConfig | dict[str, Any]) -> ExperimentConfig:
    """Check a composed config against its method family's schema and return it typed.

    Unknown keys, wrong types, missing values and out-of-range values raise ``ConfigError``
    naming the key; retired keys are dropped with a warning.
    """
    raw = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg.copy()
    OmegaConf.set_struct(raw, False)  # Hydra composes in struct mode; retired keys are removed
    _drop_retired(raw)
    family = _method_of(raw).family
    schema = OmegaConf.structured(SCHEMAS[family])
    try:
        merged = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_schema_error(exc, family)) from exc
    missing = sorted(OmegaConf.missing_keys(merged))
    _check(not missing, missing[0] if missing else "", f"has no value (missing: {missing})")
    typed = OmegaConf.to_object(merged)
    assert isinstance(typed, ExperimentConfig)
    validate(typed)
    return typed


def _drop_retired(raw: DictConfig) -> None:
    for key, why in RETIRED_KEYS.items():
        section, _, name = key.partition(".")
        node = raw.get(section)
        if isinstance(node, DictConfig) and name in node:
            node.pop(name)
            warnings.warn(f"config key '{key}' is no longer read ({why}); ignored", stacklevel=3)


def _method_of(raw: DictConfig) -> methods.Method:
    """The registered method ``method.name`` names, after importing ``method.plugins``."""
    method = raw.get("method")
    method = method if isinstance(method, DictConfig) else OmegaConf.create({})
    try:
        methods.load_plugins(list(method.get("plugins") or []))
    except ValueError as exc:
        raise ConfigError(f"config key 'method.plugins': {exc}") from exc
    name = method.get("name")
    try:
        return methods.get(str(name))
    except KeyError:
        raise ConfigError(
            f"config key 'method.name': must be one of {methods.names()}, not {name!r}"
        ) from None


def _schema_error(exc: OmegaConfBaseException, family: str) -> str:
    key = str(getattr(exc, "full_key", None) or "?")
    section = key.split(".")[0]
    others = [f for f, spec in methods.FAMILIES.items() if section in spec.sections]
    if others and family not in others:
        return (
            f"config key '{key}': the '{section}' settings are read only by methods of the "
            f"{others[0]} family; this run's method is of the {family} family"
        )
    return f"config key '{key}': {exc.msg if hasattr(exc, 'msg') else exc}"


def load_config(
    overrides: str | list[str] | None = None, config_name: str = "config"
) -> ExperimentConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides, type-check and range-check it."""
    return apply_schema(_compose(_without_retired(parse_overrides(overrides)), config_name))


def _without_retired(overrides: list[str]) -> list[str]:
    """The overrides less those setting a retired key (each dropped with a warning)."""
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RETIRED_KEYS:
            warnings.warn(
                f"config key '{key}' is no longer read ({RETIRED_KEYS[key]})", stacklevel=3
            )
        else:
            kept.append(override)
    return kept


Schema = TypeVar("Schema", bound=ExperimentConfig)


def as_schema(cfg: ExperimentConfig, schema: type[Schema]) -> Schema:
    """``cfg`` checked to be of one family's schema (``AdapterRunConfig``, ``MoERunConfig``)."""
    if not isinstance(cfg, schema):
        raise TypeError(f"method {cfg.method.name} does not run with a {schema.__name__}")
    return cfg


def load_config_as(
    schema: type[Schema], overrides: str | list[str] | None = None, config_name: str = "config"
) -> Schema:
    """:func:`load_config`, typed as the schema of the method's family."""
    return as_schema(load_config(overrides, config_name), schema)


def compose_config(overrides: str | list[str] | None = None) -> DictConfig:
    """``conf/config.yaml`` composed with Hydra overrides, not yet checked (to merge into)."""
    return _compose(parse_overrides(overrides), "config")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def check_refine_moves(refine_moves: bool, clustering: str, kmeans_weighting: str) -> None:
    """Refuse ``fltac.refine_moves`` (Hartigan's moves, defined for the unweighted objective
    within cannot-links) with any other clustering or with weighted K-means (``ConfigError``).
    One rule for the config and for a strategy built directly."""
    _check(
        not refine_moves or (clustering == "constrained_kmeans" and kmeans_weighting == "uniform"),
        "fltac.refine_moves",
        "needs fltac.clustering: constrained_kmeans and fltac.kmeans_weighting: uniform",
    )


def validate(cfg: ExperimentConfig) -> None:
    """Range checks the type system cannot express. Raises ``ConfigError`` naming the key."""
    _check(cfg.seed >= 0, "seed", "must be >= 0")
    _check(cfg.num_rounds >= 1, "num_rounds", "must be >= 1")
    _check(cfg.resume is None or bool(str(cfg.resume).strip()), "resume", "must name a run folder")
    if methods.get(cfg.method.name).needs_true_tasks:
        _check(cfg.report_true_tasks, "report_true_tasks", f"{cfg.method.name} needs true tasks")
    _check_suite(cfg.suite)
    _check_model_and_training(cfg)
    _check_federation(cfg)
    _check_robustness(cfg)
    if isinstance(cfg, AdapterRunConfig):
        _check_adapter_sections(cfg)
        for i, task in enumerate(cfg.suite.tasks):
            _check(
                task.label_map is None,
                f"suite.tasks[{i}].label_map",
                "only the mixture-of-experts methods read it (an adapter task has its own head)",
            )
    if isinstance(cfg, MoERunConfig):
        _check_moe_sections(cfg)


def _check_suite(suite: SuiteConfig) -> None:
    _check(len(suite.tasks) >= 1, "suite.tasks", "needs at least one task")
    names = [t.name for t in suite.tasks]
    _check(len(set(names)) == len(names), "suite.tasks", f"task names must be unique: {names}")
    for i, task in enumerate(suite.tasks):
        _check_task(task, f"suite.tasks[{i}]")


def is_permutation(values: Sequence[int]) -> bool:
    """Whether ``values`` holds each of ``0 .. len(values) - 1`` once (a ``label_map``)."""
    return sorted(int(v) for v in values) == list(range(len(values)))


def _check_task(task: TaskSpec, key: str) -> None:
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
            len(task.keep_classes) >= 2 and len(set(task.keep_classes)) == len(task.keep_classes),
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
        value = getattr(task, limit)
        _check(value is None or value >= 1, f"{key}.{limit}", "must be >= 1 or null")
    if task.label_map is not None:
        _check(
            is_permutation(task.label_map) and len(task.label_map) >= 2,
            f"{key}.label_map",
            "must be a permutation of 0 .. C - 1 (C >= 2, the domain's classes)",
        )


def _check_model_and_training(cfg: ExperimentConfig) -> None:
    _check(cfg.model.pooling in ("cls", "mean"), "model.pooling", "must be 'cls' or 'mean'")
    _check(cfg.model.max_length >= 8, "model.max_length", "must be >= 8")
    size = cfg.model.image_size
    _check(size is None or size >= 1, "model.image_size", "must be >= 1 or null")
    train = cfg.train
    _check(train.local_epochs > 0, "train.local_epochs", "must be > 0")
    _check(
        train.local_steps is None or train.local_steps >= 1,
        "train.local_steps",
        "must be >= 1 or null",
    )
    _check(train.optimizer in ("adamw", "sgd"), "train.optimizer", "must be 'adamw' or 'sgd'")
    _check(0.0 <= train.momentum < 1.0, "train.momentum", "must be in [0, 1)")
    _check(train.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(train.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    _check(train.lr > 0, "train.lr", "must be > 0")
    _check(train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(train.num_threads >= 0, "train.num_threads", "must be >= 0 (0 = all cores)")
    _check(
        train.device in ("auto", "cpu", "mps") or str(train.device).startswith("cuda"),
        "train.device",
        "must be auto, cpu, mps, cuda or cuda:<index>",
    )


def _check_robustness(cfg: ExperimentConfig) -> None:
    robust, faults, dp = cfg.robust, cfg.faults, cfg.privacy
    check_section("robust", robust, ROBUST_KEYS)
    _check(faults.kind in FAULT_KINDS, "faults.kind", f"must be one of {FAULT_KINDS}")
    _check(0.0 <= faults.fraction <= 1.0, "faults.fraction", "must be in [0, 1]")
    _check(faults.scale > 0, "faults.scale", "must be > 0")
    if faults.kind == "other_task":
        _check(isinstance(cfg, AdapterRunConfig), "faults.kind", "other_task is FL-TAC's only")
    for key in ("clipping_norm", "epsilon"):
        _check(getattr(dp, key) > 0, f"privacy.{key}", "must be > 0")
    # The Gaussian mechanism's std has ln(1.25 / delta): delta >= 1.25 makes it NaN (a math
    # domain error in noise_std), and a delta of 1 or more is no privacy guarantee at all.
    _check(0.0 < dp.delta < 1.0, "privacy.delta", "must be in (0, 1)")
    _check(dp.sensitivity >= 0, "privacy.sensitivity", "must be >= 0")


def _check_federation(cfg: ExperimentConfig) -> None:
    fed, part = cfg.federation, cfg.partition
    _check(fed.num_clients >= 1, "federation.num_clients", "must be >= 1")
    check_setting("federation.fraction_train", fed.fraction_train)
    check_setting("federation.min_replies", fed.min_replies)
    _check(  # more could never reply: no round would ever be aggregated
        fed.min_replies <= fed.num_clients,
        "federation.min_replies",
        f"must be <= federation.num_clients ({fed.num_clients})",
    )
    _check(fed.node_wait_s >= 0, "federation.node_wait_s", "must be >= 0")
    _check(fed.reply_timeout_s > 0, "federation.reply_timeout_s", "must be > 0")
    _check(fed.evaluate_every >= 1, "federation.evaluate_every", "must be >= 1")
    _check(fed.max_in_flight >= 0, "federation.max_in_flight", "must be >= 0 (0: no limit)")
    _check(part.alpha > 0, "partition.alpha", "must be > 0")
    _check(0.0 <= part.min_share < 1.0, "partition.min_share", "must be in [0, 1)")
    _check(part.domain_alpha > 0, "partition.domain_alpha", "must be > 0")
    for key in ("train_per_client", "test_per_client"):
        value = getattr(part, key)
        _check(value is None or value >= 1, f"partition.{key}", "must be >= 1 or null")
    _check(cfg.validation.max_abs_value > 0, "validation.max_abs_value", "must be > 0")
    bound = cfg.validation.max_update_norm
    _check(bound is None or bound > 0, "validation.max_update_norm", "must be > 0 or null")


def _check_adapter_sections(cfg: AdapterRunConfig) -> None:
    _check(cfg.lora.rank >= 1, "lora.rank", "must be >= 1")
    _check(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    _check(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    fltac = cfg.fltac
    check_section("fltac", fltac, ("num_clusters", *FLTAC_CHOICES, "source_check_llr"))
    _check(fltac.auto_k_min >= 2, "fltac.auto_k_min", "must be >= 2")
    _check(fltac.auto_k_max >= fltac.auto_k_min, "fltac.auto_k_max", "must be >= auto_k_min")
    _check(fltac.kmeans_n_init >= 1, "fltac.kmeans_n_init", "must be >= 1")
    _check(fltac.projection_dim >= 0, "fltac.projection_dim", "must be >= 0 (0 = never)")
    _check(fltac.projection_min_adapters >= 0, "fltac.projection_min_adapters", "must be >= 0")
    if fltac.reject_label_count_mismatch:
        _check(
            fltac.label_fingerprint,
            "fltac.reject_label_count_mismatch",
            "needs fltac.label_fingerprint: true (the classes each slot's data has)",
        )
        _check(  # weight decay moves every logit of the head, honest or not
            cfg.train.weight_decay == 0,
            "fltac.reject_label_count_mismatch",
            "needs train.weight_decay: 0 (weight decay moves every logit)",
        )
    _check(
        fltac.reject_label_count_mismatch or not fltac.reorder_mismatched_adapters,
        "fltac.reorder_mismatched_adapters",
        "needs fltac.reject_label_count_mismatch: true (the check that finds them)",
    )
    check_refine_moves(fltac.refine_moves, fltac.clustering, fltac.kmeans_weighting)


def _check_moe_sections(cfg: MoERunConfig) -> None:
    moe, fm, peer = cfg.moe, cfg.fedmoe_da, cfg.peer
    _check(len(moe.channels) >= 1 and min(moe.channels) >= 1, "moe.channels", "needs widths >= 1")
    for key in ("pooled_size", "projection_dim", "num_experts", "expert_hidden"):
        _check(getattr(moe, key) >= 1, f"moe.{key}", "must be >= 1")
    _check(
        0 <= moe.private_experts <= moe.num_experts,
        "moe.private_experts",
        "must be in 0..moe.num_experts (each is a copy of a shared expert at the start)",
    )
    _check(
        moe.private_mode in PRIVATE_MODES,
        "moe.private_mode",
        f"must be one of {', '.join(PRIVATE_MODES)}",
    )
    _check(
        1 <= moe.top_k <= routed_experts(moe.num_experts, moe.private_experts, moe.private_mode),
        "moe.top_k",
        "must be in 1..moe.num_experts (+ moe.private_experts when moe.private_mode is routed)",
    )
    _check(
        moe.dense_hidden is None or moe.dense_hidden >= 1,
        "moe.dense_hidden",
        "must be >= 1 or null",
    )
    _check(moe.load_balance_coef >= 0, "moe.load_balance_coef", "must be >= 0")
    _check(moe.global_test_per_domain >= 1, "moe.global_test_per_domain", "must be >= 1")
    mixing = ("num_peers", "tau", "interval", "self_weight", "mix_every", "pool_max_age", "prox_mu")
    check_section("fedmoe_da", fm, mixing)
    _check(fm.proxy in PROXIES, "fedmoe_da.proxy", f"must be one of {', '.join(PROXIES)}")
    _check(peer.max_bytes >= 1, "peer.max_bytes", "must be >= 1")
    _check(peer.timeout_s > 0, "peer.timeout_s", "must be > 0")
    _check(peer.grant_ttl_s > 0, "peer.grant_ttl_s", "must be > 0")
    for key in ("train_per_client", "test_per_client"):
        _check(
            getattr(cfg.partition, key) is not None,
            f"partition.{key}",
            f"required by the mixture-of-experts method {cfg.method.name}",
        )
    kinds = {t.kind for t in cfg.suite.tasks}
    _check(
        kinds in ({"image_classification"}, {"text_classification"}),
        "suite.tasks",
        "a mixture-of-experts suite needs all-image or all-text classification tasks",
    )


def num_clusters(cfg: AdapterRunConfig) -> int | str:
    """K for FL-TAC: the configured value, or the number of tasks when unset (the paper)."""
    k = cfg.fltac.num_clusters
    return len(cfg.suite.tasks) if k is None else k


def to_yaml(cfg: ExperimentConfig | DictConfig | ListConfig) -> str:
    """The config as YAML (what ``config.yaml`` in a run folder holds)."""
    if isinstance(cfg, ExperimentConfig):
        return OmegaConf.to_yaml(OmegaConf.structured(cfg))
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
