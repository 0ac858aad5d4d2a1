"""Configuration: shipped configs compose; bad keys and values are refused with the key named."""

from __future__ import annotations

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
    ],
)
def test_shipped_configs_compose(overrides: str) -> None:
    cfg = load_config(overrides)
    assert cfg.suite.tasks


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
