"""Configuration: shipped configs compose; bad keys and values are refused with the key named."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedspecialists.config import (
    AdapterRunConfig,
    ConfigError,
    load_config,
    load_config_as,
    num_clusters,
)


@pytest.mark.parametrize(
    "overrides",
    [
        "",
        "method=fedit",
        "method=oracle",
        "method=local",
        "suite=glue model=bert_base",
        "suite=cifar model=vit_b16",
        "suite=dolly model=causal_lm",
        "suite=tiny_text model=tiny_bert",
        "method=fedmoe_da",
        "method=fedmoe_da_p0",
        "method=fedavg_moe",
        "method=fedavg_dense",
        "method=local_moe",
        "method=fedmoe_da suite=offline_text",
        "method=fedmoe_da suite=cifar10",
        "+experiment=rank_sweep",
        "+experiment=fedmoe_da_scarce",
        "+experiment=fedmoe_da_conflict",
    ],
)
def test_shipped_configs_compose(overrides: str) -> None:
    cfg = load_config(overrides)
    assert cfg.suite.tasks


def test_the_sign_flip_defence_sets_its_five_keys_and_nothing_else() -> None:
    plain = load_config_as(AdapterRunConfig, "seed=1")
    cfg = load_config_as(AdapterRunConfig, "seed=1 +defence=fltac_sign_flip")
    assert cfg.robust.rule == "mean"
    assert cfg.robust.drop_opposed_updates is True
    assert cfg.robust.drop_opposed_scope == "node"
    assert cfg.fltac.label_fingerprint is True
    assert cfg.fltac.fingerprints_only_from_v0 is True
    plain.robust.drop_opposed_updates = True
    plain.robust.drop_opposed_scope = "node"
    plain.fltac.label_fingerprint = True
    plain.fltac.fingerprints_only_from_v0 = True
    assert cfg == plain
    # later overrides win; FL-TAC's keys on a MoE method are refused, named
    assert load_config("+defence=fltac_sign_flip robust.rule=median").robust.rule == "median"
    with pytest.raises(ConfigError, match="'fltac'"):
        load_config("+defence=fltac_sign_flip method=fedmoe_da")


def test_the_finite_attack_defence_is_the_sign_flip_defence_the_step_clip_and_the_slots() -> None:
    sign_flip = load_config_as(AdapterRunConfig, "seed=1 +defence=fltac_sign_flip")
    cfg = load_config_as(AdapterRunConfig, "seed=1 +defence=fltac_finite_attacks")
    assert cfg.robust.clip_outlier_norms_for_steps is True
    assert cfg.fltac.reject_label_count_mismatch is True
    assert cfg.fltac.reorder_mismatched_adapters is True
    sign_flip.robust.clip_outlier_norms_for_steps = True
    sign_flip.fltac.reject_label_count_mismatch = True
    sign_flip.fltac.reorder_mismatched_adapters = True
    assert cfg == sign_flip
    override = "+defence=fltac_finite_attacks robust.clip_outlier_norms_for_steps=false"
    assert load_config(override).robust.clip_outlier_norms_for_steps is False


def test_method_defaults_follow_the_paper() -> None:
    assert load_config_as(AdapterRunConfig, "").lora.rank == 1  # FL-TAC: rank 1 per task
    assert (
        load_config_as(AdapterRunConfig, "method=fedit").lora.rank == 16
    )  # FedIT: rank 16 (Table 2)
    assert (
        load_config_as(AdapterRunConfig, "method=fedit lora.rank=4").lora.rank == 4
    )  # the user's override wins
    assert num_clusters(load_config_as(AdapterRunConfig, "")) == 4  # K = number of tasks by default
    assert num_clusters(load_config_as(AdapterRunConfig, "fltac.num_clusters=auto")) == "auto"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ("fltac.no_such_key=1", "fltac.no_such_key"),
        ("+no_such_key=1", "no_such_key"),
        ("lora.rank=0", "lora.rank"),
        ("lora.rank=abc", "lora.rank"),
        ("lora.alpha=-1", "lora.alpha"),
        ("partition.alpha=0", "partition.alpha"),
        ("partition.min_share=1.5", "partition.min_share"),
        ("federation.fraction_train=0", "federation.fraction_train"),
        ("federation.fraction_train=1.5", "federation.fraction_train"),
        ("federation.min_replies=0", "federation.min_replies"),
        ("train.lr=0", "train.lr"),
        ("train.local_epochs=-1", "train.local_epochs"),
        ("train.local_steps=0", "train.local_steps"),
        ("train.optimizer=lion", "train.optimizer"),
        ("fltac.num_clusters=0", "fltac.num_clusters"),
        ("fltac.num_clusters=many", "fltac.num_clusters"),
        ("fltac.feature_source=gradients", "fltac.feature_source"),
        ("fltac.weighting=median", "fltac.weighting"),
        ("num_rounds=0", "num_rounds"),
        ("method.name=fedprox", "method.name"),
        ("model.pooling=max", "model.pooling"),
        ("validation.max_abs_value=0", "validation.max_abs_value"),
        ("method=oracle report_true_tasks=false", "report_true_tasks"),
        ("suite.tasks.0.source=ftp", "suite.tasks[0].source"),
        ("method=fedmoe_da fedmoe_da.num_peers=-1", "fedmoe_da.num_peers"),
        ("method=fedmoe_da fedmoe_da.tau=0", "fedmoe_da.tau"),
        ("method=fedmoe_da fedmoe_da.interval=0", "fedmoe_da.interval"),
        ("method=fedmoe_da moe.top_k=5", "moe.top_k"),
        ("method=fedmoe_da moe.num_experts=0", "moe.num_experts"),
        ("method=fedmoe_da partition.domain_alpha=0", "partition.domain_alpha"),
        ("method=fedmoe_da partition.train_per_client=null", "partition.train_per_client"),
        ("method=fedmoe_da fltac.num_clusters=3", "fltac"),  # another family's settings
        ("method.plugins=[no_such_module]", "method.plugins"),
        ("method=fedmoe_da moe.no_such_key=1", "moe.no_such_key"),
        ("method=fedmoe_da fedmoe_da.tau=warm", "fedmoe_da.tau"),
        ("fltac.refine_moves=true fltac.kmeans_weighting=samples", "fltac.refine_moves"),
        ("fltac.refine_moves=true fltac.clustering=kmeans", "fltac.refine_moves"),
    ],
)
def test_bad_values_are_refused_naming_the_key(overrides: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    assert key in str(info.value)


def test_retired_keys_are_accepted_with_a_warning() -> None:
    # Old commands keep working: the key is dropped, the run is what it would have been.
    with pytest.warns(UserWarning, match="method.adapters"):
        cfg = load_config("method=fedit method.adapters=shared")
    assert cfg == load_config("method=fedit")
    with pytest.warns(UserWarning, match="peer.transport"):
        load_config("method=fedmoe_da peer.transport=local")


def test_a_run_records_only_its_own_familys_sections() -> None:
    from fedspecialists.config import to_yaml

    assert {"lora", "fltac"} <= set(OmegaConf.create(to_yaml(load_config(""))))
    moe = set(OmegaConf.create(to_yaml(load_config("method=fedmoe_da"))))
    assert {"moe", "fedmoe_da", "peer"} <= moe and not {"lora", "fltac"} & moe


def test_every_default_comes_from_conf() -> None:
    # The schema holds types only: a key conf/ does not set is missing, and named.
    from fedspecialists.config import apply_schema, compose_config

    base = compose_config()
    OmegaConf.set_struct(base, False)
    del base.train["lr"]
    with pytest.raises(ConfigError, match=r"train\.lr"):
        apply_schema(base)


# ------------------------------------------------------------------------------------------
# Every range and cross-field check of fedspecialists/config.py's validate(), each bad value
# refused naming its key and each boundary value accepted. With the cases above, every check
# has at least one refused case. Overrides without method= run FL-TAC on offline_text; with
# method=fedmoe_da, offline_images (num_experts = 4).
# ------------------------------------------------------------------------------------------

MOE = "method=fedmoe_da"

# (overrides, key named in the error): range checks.
OUT_OF_RANGE = [
    ("seed=-1", "seed"),
    ("resume=", "resume"),  # an empty string names no run folder
    ("resume=' '", "resume"),
    ("suite.tasks=[]", "suite.tasks"),
    ("+suite.tasks.0.kind=video", "suite.tasks[0].kind"),
    ("+suite.tasks.0.test_fraction=0", "suite.tasks[0].test_fraction"),  # (0, 1): both ends out
    ("+suite.tasks.0.test_fraction=1", "suite.tasks[0].test_fraction"),
    ("+suite.tasks.0.keep_classes=[a]", "suite.tasks[0].keep_classes"),  # at least two
    ("+suite.tasks.0.keep_classes=[a,a]", "suite.tasks[0].keep_classes"),  # distinct
    ("+suite.tasks.0.image_shape=[1,28]", "suite.tasks[0].image_shape"),  # not [C, H, W]
    ("+suite.tasks.0.image_shape=[2,28,28]", "suite.tasks[0].image_shape"),  # C not 1 or 3
    ("+suite.tasks.0.image_shape=[1,0,28]", "suite.tasks[0].image_shape"),  # H < 1
    ("+suite.tasks.0.image_shape=[3,28,0]", "suite.tasks[0].image_shape"),  # W < 1
    ("suite.tasks.0.max_train_examples=0", "suite.tasks[0].max_train_examples"),
    ("suite.tasks.0.max_test_examples=0", "suite.tasks[0].max_test_examples"),
    (f"{MOE} +suite.tasks.0.label_map=[0,0]", "suite.tasks[0].label_map"),  # not a permutation
    (f"{MOE} +suite.tasks.0.label_map=[1,2]", "suite.tasks[0].label_map"),  # not 0 .. C - 1
    (f"{MOE} +suite.tasks.0.label_map=[0]", "suite.tasks[0].label_map"),  # C >= 2
    ("model.max_length=7", "model.max_length"),
    ("train.local_epochs=0", "train.local_epochs"),  # > 0: 0 is out
    ("train.momentum=1", "train.momentum"),  # [0, 1)
    ("train.momentum=-0.1", "train.momentum"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.eval_batch_size=0", "train.eval_batch_size"),
    ("train.lr=-0.001", "train.lr"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.num_threads=-1", "train.num_threads"),
    ("train.device=tpu", "train.device"),
    ("train.device=gpu:0", "train.device"),
    ("robust.rule=mode", "robust.rule"),
    ("robust.trim_fraction=0.5", "robust.trim_fraction"),  # [0, 0.5)
    ("robust.trim_fraction=-0.1", "robust.trim_fraction"),
    ("robust.clip_norm=0", "robust.clip_norm"),
    ("robust.drop_opposed_updates=maybe", "robust.drop_opposed_updates"),
    ("robust.clip_to_median_norm=sometimes", "robust.clip_to_median_norm"),
    ("robust.clip_outlier_norms=often", "robust.clip_outlier_norms"),
    ("robust.clip_outlier_norms_for_steps=seldom", "robust.clip_outlier_norms_for_steps"),
    ("robust.drop_opposed_scope=client", "robust.drop_opposed_scope"),
    ("faults.kind=meteor", "faults.kind"),
    ("faults.fraction=-0.1", "faults.fraction"),  # [0, 1]
    ("faults.fraction=1.1", "faults.fraction"),
    ("faults.scale=0", "faults.scale"),
    ("privacy.clipping_norm=0", "privacy.clipping_norm"),
    ("privacy.epsilon=0", "privacy.epsilon"),
    ("privacy.delta=0", "privacy.delta"),  # (0, 1)
    ("privacy.delta=1", "privacy.delta"),
    ("privacy.delta=2", "privacy.delta"),  # ln(1.25 / 2) < 0: no noise std at all
    ("privacy.sensitivity=-1", "privacy.sensitivity"),
    ("federation.num_clients=0", "federation.num_clients"),
    ("federation.node_wait_s=-1", "federation.node_wait_s"),
    ("federation.reply_timeout_s=0", "federation.reply_timeout_s"),
    ("federation.evaluate_every=0", "federation.evaluate_every"),
    ("partition.alpha=-1", "partition.alpha"),
    ("partition.min_share=1", "partition.min_share"),  # [0, 1)
    ("partition.min_share=-0.1", "partition.min_share"),
    ("partition.train_per_client=0", "partition.train_per_client"),  # >= 1 or null
    ("partition.test_per_client=0", "partition.test_per_client"),
    ("validation.max_abs_value=-1", "validation.max_abs_value"),
    ("validation.max_update_norm=0", "validation.max_update_norm"),
    ("lora.alpha=0", "lora.alpha"),
    ("lora.dropout=1", "lora.dropout"),  # [0, 1)
    ("lora.dropout=-0.1", "lora.dropout"),
    ("fltac.num_clusters=true", "fltac.num_clusters"),  # a bool is not an int here
    ("fltac.num_clusters=-2", "fltac.num_clusters"),
    ("fltac.auto_k_min=1", "fltac.auto_k_min"),
    ("fltac.clustering=dbscan", "fltac.clustering"),
    ("fltac.feature_tensors=bias", "fltac.feature_tensors"),
    ("fltac.kmeans_n_init=0", "fltac.kmeans_n_init"),
    ("fltac.kmeans_weighting=examples", "fltac.kmeans_weighting"),
    ("fltac.projection_dim=-1", "fltac.projection_dim"),
    ("fltac.projection_min_adapters=-1", "fltac.projection_min_adapters"),
    ("fltac.source_check_llr=0", "fltac.source_check_llr"),
    (f"{MOE} moe.channels=[]", "moe.channels"),
    (f"{MOE} moe.channels=[4,0]", "moe.channels"),
    (f"{MOE} moe.pooled_size=0", "moe.pooled_size"),
    (f"{MOE} moe.projection_dim=0", "moe.projection_dim"),
    (f"{MOE} moe.expert_hidden=0", "moe.expert_hidden"),
    (f"{MOE} moe.dense_hidden=0", "moe.dense_hidden"),
    (f"{MOE} moe.load_balance_coef=-0.1", "moe.load_balance_coef"),
    (f"{MOE} moe.global_test_per_domain=0", "moe.global_test_per_domain"),
    (f"{MOE} fedmoe_da.self_weight=-0.1", "fedmoe_da.self_weight"),  # [0, 1]
    (f"{MOE} fedmoe_da.self_weight=1.1", "fedmoe_da.self_weight"),
    (f"{MOE} fedmoe_da.mix_every=0", "fedmoe_da.mix_every"),
    (f"{MOE} fedmoe_da.pool_max_age=0", "fedmoe_da.pool_max_age"),
    (f"{MOE} fedmoe_da.proxy=expert", "fedmoe_da.proxy"),
    (f"{MOE} peer.max_bytes=0", "peer.max_bytes"),
    (f"{MOE} peer.timeout_s=0", "peer.timeout_s"),
    (f"{MOE} peer.grant_ttl_s=0", "peer.grant_ttl_s"),
]

# (overrides, key named in the error): checks of one field against another.
CROSS_FIELD_REFUSED = [
    ("suite.tasks.1.name=bbc_topic", "suite.tasks"),  # two tasks named bbc_topic
    ("suite.tasks.0.builtin=null", "suite.tasks[0].builtin"),  # source=builtin needs builtin
    ("suite.tasks.0.source=hub", "suite.tasks[0].path"),  # source=hub needs path
    ("suite.tasks.0.source=files", "suite.tasks[0].data_files"),  # needs a train file
    (f"{MOE} faults.kind=other_task", "faults.kind"),  # FL-TAC's only
    ("fltac.auto_k_min=5 fltac.auto_k_max=4", "fltac.auto_k_max"),  # max >= min
    (f"{MOE} moe.top_k=0", "moe.top_k"),  # 1..num_experts
    (f"{MOE} moe.num_experts=2 moe.top_k=3", "moe.top_k"),
    (f"{MOE} moe.private_experts=-1", "moe.private_experts"),  # 0..num_experts
    (f"{MOE} moe.private_experts=5", "moe.private_experts"),
    (f"{MOE} moe.private_experts=2 moe.top_k=7", "moe.top_k"),  # 1..K + K_p
    (f"{MOE} moe.private_experts=2 moe.private_mode=paired moe.top_k=5", "moe.top_k"),  # 1..K
    (f"{MOE} moe.private_mode=blended", "moe.private_mode"),
    (f"{MOE} partition.test_per_client=null", "partition.test_per_client"),  # MoE needs it
    (f"{MOE} suite.tasks.0.kind=text_classification", "suite.tasks"),  # image and text mixed
    (f"{MOE} suite=dolly", "suite.tasks"),  # causal LM tasks
    ("federation.num_clients=3 federation.min_replies=4", "federation.min_replies"),
    ("model.image_size=0", "model.image_size"),
    ("+suite.tasks.0.label_map=[1,0]", "suite.tasks[0].label_map"),  # MoE domains only
    # the classes each slot has come from its label fingerprint
    ("fltac.reject_label_count_mismatch=true", "fltac.reject_label_count_mismatch"),
    (  # weight decay moves every logit
        "+defence=fltac_sign_flip fltac.reject_label_count_mismatch=true train.weight_decay=0.01",
        "fltac.reject_label_count_mismatch",
    ),
    ("+defence=fltac_finite_attacks train.weight_decay=0.01", "fltac.reject_label_count_mismatch"),
    ("fltac.reorder_mismatched_adapters=true", "fltac.reorder_mismatched_adapters"),
]


@pytest.mark.parametrize(("overrides", "key"), OUT_OF_RANGE + CROSS_FIELD_REFUSED)
def test_every_check_refuses_naming_the_key(overrides: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}':")):
        load_config(overrides)


# (overrides, the value's path in the typed config, the value): each at a range's end that is
# in the range, or the other field's value that a cross-field check allows.
ACCEPTED = [
    ("seed=0", "seed", 0),
    ("num_rounds=1", "num_rounds", 1),
    ("resume=runs/a", "resume", "runs/a"),
    ("resume=null", "resume", None),
    (
        "+suite.tasks.1.keep_classes=[positive,negative]",
        "suite.tasks.1.keep_classes",
        ["positive", "negative"],
    ),
    ("+suite.tasks.0.image_shape=[1,1,1]", "suite.tasks.0.image_shape", [1, 1, 1]),
    (f"{MOE} +suite.tasks.0.label_map=[1,0]", "suite.tasks.0.label_map", [1, 0]),
    ("+suite.tasks.0.image_shape=[3,28,28]", "suite.tasks.0.image_shape", [3, 28, 28]),
    ("suite.tasks.0.max_train_examples=1", "suite.tasks.0.max_train_examples", 1),
    ("suite.tasks.0.max_test_examples=null", "suite.tasks.0.max_test_examples", None),
    ("suite.tasks.0.source=hub +suite.tasks.0.path=/data/bbc", "suite.tasks.0.path", "/data/bbc"),
    (
        "suite.tasks.0.source=files +suite.tasks.0.data_files={train:t.csv}",
        "suite.tasks.0.data_files",
        {"train": "t.csv"},
    ),
    ("model.max_length=8", "model.max_length", 8),
    ("model.pooling=cls", "model.pooling", "cls"),
    ("train.local_epochs=0.01", "train.local_epochs", 0.01),
    ("train.local_steps=1", "train.local_steps", 1),
    ("train.local_steps=null", "train.local_steps", None),
    ("train.optimizer=sgd", "train.optimizer", "sgd"),
    ("train.momentum=0", "train.momentum", 0.0),
    ("train.batch_size=1", "train.batch_size", 1),
    ("train.eval_batch_size=1", "train.eval_batch_size", 1),
    ("train.weight_decay=0", "train.weight_decay", 0.0),
    ("train.num_threads=0", "train.num_threads", 0),
    ("federation.evaluate_every=1", "federation.evaluate_every", 1),
    ("train.device=cpu", "train.device", "cpu"),
    ("train.device=mps", "train.device", "mps"),
    ("train.device=cuda", "train.device", "cuda"),
    ("train.device=cuda:1", "train.device", "cuda:1"),
    ("robust.rule=median", "robust.rule", "median"),
    ("robust.rule=trimmed_mean robust.trim_fraction=0", "robust.trim_fraction", 0.0),
    ("robust.trim_fraction=0.49", "robust.trim_fraction", 0.49),
    ("robust.clip_norm=null", "robust.clip_norm", None),
    ("robust.drop_opposed_updates=true", "robust.drop_opposed_updates", True),
    ("robust.drop_opposed_scope=node", "robust.drop_opposed_scope", "node"),
    ("robust.clip_to_median_norm=true", "robust.clip_to_median_norm", True),
    ("robust.clip_outlier_norms=true", "robust.clip_outlier_norms", True),
    ("robust.clip_outlier_norms_for_steps=true", "robust.clip_outlier_norms_for_steps", True),
    ("faults.kind=crash faults.fraction=0", "faults.fraction", 0.0),
    ("faults.kind=crash faults.fraction=1", "faults.fraction", 1.0),
    ("faults.kind=other_task", "faults.kind", "other_task"),  # FL-TAC
    ("privacy.sensitivity=0", "privacy.sensitivity", 0.0),
    ("privacy.delta=0.5", "privacy.delta", 0.5),
    ("federation.num_clients=1", "federation.num_clients", 1),
    ("federation.fraction_train=1", "federation.fraction_train", 1.0),  # (0, 1]
    ("federation.min_replies=1", "federation.min_replies", 1),
    ("federation.num_clients=3 federation.min_replies=3", "federation.min_replies", 3),
    ("federation.node_wait_s=0", "federation.node_wait_s", 0.0),
    ("partition.min_share=0", "partition.min_share", 0.0),
    ("partition.train_per_client=1", "partition.train_per_client", 1),
    ("partition.train_per_client=null", "partition.train_per_client", None),  # FL-TAC
    ("validation.max_update_norm=null", "validation.max_update_norm", None),
    ("lora.rank=1", "lora.rank", 1),
    ("lora.dropout=0", "lora.dropout", 0.0),
    ("fltac.num_clusters=1", "fltac.num_clusters", 1),
    ("fltac.num_clusters=null", "fltac.num_clusters", None),
    ("fltac.auto_k_min=2", "fltac.auto_k_min", 2),
    ("fltac.auto_k_min=5 fltac.auto_k_max=5", "fltac.auto_k_max", 5),  # max = min
    ("fltac.clustering=kmeans", "fltac.clustering", "kmeans"),
    ("fltac.feature_tensors=all", "fltac.feature_tensors", "all"),
    ("fltac.kmeans_n_init=1", "fltac.kmeans_n_init", 1),
    ("fltac.kmeans_weighting=samples", "fltac.kmeans_weighting", "samples"),
    ("fltac.projection_dim=0", "fltac.projection_dim", 0),
    ("fltac.projection_min_adapters=0", "fltac.projection_min_adapters", 0),
    ("federation.fold_evaluation=true", "federation.fold_evaluation", True),
    ("data.cache_encoded=false", "data.cache_encoded", False),
    ("output.tensorboard=true", "output.tensorboard", True),
    (f"{MOE} moe.channels=[1]", "moe.channels", [1]),
    (f"{MOE} moe.pooled_size=1", "moe.pooled_size", 1),
    (f"{MOE} moe.top_k=1", "moe.top_k", 1),
    (f"{MOE} moe.top_k=4", "moe.top_k", 4),  # = num_experts
    (f"{MOE} moe.private_experts=4 moe.top_k=8", "moe.top_k", 8),  # = K + K_p
    (f"{MOE} moe.private_experts=4", "moe.private_experts", 4),
    (f"{MOE} moe.private_experts=4 moe.private_mode=paired", "moe.private_mode", "paired"),
    (f"{MOE} moe.num_experts=1 moe.top_k=1", "moe.num_experts", 1),
    (f"{MOE} moe.dense_hidden=1", "moe.dense_hidden", 1),
    (f"{MOE} moe.dense_hidden=null", "moe.dense_hidden", None),
    (f"{MOE} moe.load_balance_coef=0", "moe.load_balance_coef", 0.0),
    (f"{MOE} moe.global_test_per_domain=1", "moe.global_test_per_domain", 1),
    (f"{MOE} fedmoe_da.num_peers=0", "fedmoe_da.num_peers", 0),
    (f"{MOE} fedmoe_da.interval=1", "fedmoe_da.interval", 1),
    (f"{MOE} fedmoe_da.self_weight=0", "fedmoe_da.self_weight", 0.0),
    (f"{MOE} fedmoe_da.self_weight=1", "fedmoe_da.self_weight", 1.0),
    (f"{MOE} fedmoe_da.mix_every=1", "fedmoe_da.mix_every", 1),
    (f"{MOE} fedmoe_da.pool_max_age=1", "fedmoe_da.pool_max_age", 1),
    (f"{MOE} fedmoe_da.proxy=routed_mean", "fedmoe_da.proxy", "routed_mean"),
    (f"{MOE} peer.max_bytes=1", "peer.max_bytes", 1),
    (f"{MOE} partition.train_per_client=1", "partition.train_per_client", 1),
    (f"{MOE} partition.test_per_client=1", "partition.test_per_client", 1),
    (f"{MOE} suite=offline_text", "suite.name", "offline_text"),  # all text: allowed
    (  # with the label fingerprints and no weight decay
        "+defence=fltac_sign_flip fltac.reject_label_count_mismatch=true train.weight_decay=0",
        "fltac.reject_label_count_mismatch",
        True,
    ),
    ("+defence=fltac_finite_attacks", "fltac.reorder_mismatched_adapters", True),
]


def _at(cfg: object, path: str) -> object:
    """The value at a dotted path of the typed config (a number indexes a list)."""
    value = cfg
    for part in path.split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)  # type: ignore[index]
    return value


@pytest.mark.parametrize(("overrides", "path", "value"), ACCEPTED)
def test_boundary_values_are_accepted(overrides: str, path: str, value: object) -> None:
    assert _at(load_config(overrides), path) == value


def _moe_strategy(**kwargs: Any) -> object:
    from strategies.fedmoe_da import DomainAwareMoEAggregation

    return DomainAwareMoEAggregation({}, [], 4, **kwargs)


def _fltac_strategy(**kwargs: Any) -> object:
    from strategies.fltac import TaskAdapterClustering

    return TaskAdapterClustering({"w": np.zeros(2)}, kwargs.pop("num_clusters", 2), **kwargs)


def _robust(**kwargs: Any) -> object:
    from strategies.robust import RobustAggregation

    return RobustAggregation(**kwargs)


MOE_STRATEGY = "strategies.fedmoe_da:DomainAwareMoEAggregation"


# (config override, the same value given to a constructor): both refuse it the same way, because
# both check it with the one rule of its key (check_setting).
ONE_RULE = [
    ("method=fedmoe_da fedmoe_da.num_peers=-1", _moe_strategy, {"num_peers": -1}),
    ("method=fedmoe_da fedmoe_da.tau=0", _moe_strategy, {"tau": 0.0}),
    ("method=fedmoe_da fedmoe_da.self_weight=1.5", _moe_strategy, {"self_weight": 1.5}),
    ("method=fedmoe_da fedmoe_da.interval=0", _moe_strategy, {"interval": 0}),
    ("method=fedmoe_da fedmoe_da.mix_every=0", _moe_strategy, {"mix_every": 0}),
    ("method=fedmoe_da fedmoe_da.pool_max_age=0", _moe_strategy, {"pool_max_age": 0}),
    ("federation.fraction_train=1.5", _fltac_strategy, {"fraction_train": 1.5}),
    ("federation.min_replies=0", _fltac_strategy, {"min_replies": 0}),
    ("fltac.num_clusters=0", _fltac_strategy, {"num_clusters": 0}),
    ("fltac.weighting=median", _fltac_strategy, {"weighting": "median"}),
    ("fltac.clustering=dbscan", _fltac_strategy, {"clustering": "dbscan"}),
    ("fltac.feature_source=gradients", _fltac_strategy, {"feature_source": "gradients"}),
    ("fltac.source_check_llr=0", _fltac_strategy, {"source_check_llr": 0.0}),
    ("robust.rule=max", _robust, {"rule": "max"}),
    ("robust.trim_fraction=0.5", _robust, {"trim_fraction": 0.5}),
    ("robust.clip_norm=0", _robust, {"clip_norm": 0.0}),
]


@pytest.mark.parametrize(("override", "build", "kwargs"), ONE_RULE)
def test_the_config_and_the_constructor_refuse_a_value_with_the_same_rule(
    override: str, build: Callable[..., object], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as from_config:
        load_config(override)
    with pytest.raises(ConfigError) as from_constructor:
        build(**kwargs)
    message = str(from_constructor.value)
    assert message.startswith(f"config key '{override.split()[-1].split('=')[0]}': ")
    # The same rule text; the value as each side holds it (the config's 0 may be the caller's 0.0).
    assert str(from_config.value).rsplit(", not ", 1)[0] == message.rsplit(", not ", 1)[0]


@pytest.mark.parametrize(
    ("overrides", "strategy"),
    [("", "strategies.fltac:TaskAdapterClustering"), ("method=fedmoe_da", MOE_STRATEGY)],
)
def test_a_strategy_built_without_a_config_has_the_defaults_of_conf(
    overrides: str, strategy: str
) -> None:
    """conf/ is the one source of defaults: a constructor's keyword defaults repeat it, and
    this test keeps them equal (a parameter without a default, e.g. K, has none to repeat)."""
    import importlib
    import inspect

    module, name = strategy.split(":")
    cls = getattr(importlib.import_module(module), name)
    from_conf = cls.config_kwargs(load_config(overrides))
    defaults = {
        key: p.default
        for key, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty and key in from_conf and key != "robust"
    }
    assert len(defaults) >= 10
    assert defaults == {key: from_conf[key] for key in defaults}
    if "robust" in from_conf:  # the constructor's None is RobustAggregation()'s defaults
        from strategies.robust import RobustAggregation

        assert from_conf["robust"] == RobustAggregation()
