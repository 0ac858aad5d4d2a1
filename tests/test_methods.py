"""The registry of methods: every shipped method resolves to real code, bad entries are refused."""

from __future__ import annotations

import pytest

from fedspecialists import methods
from fedspecialists.config import load_config
from fedspecialists.methods import Method, register

SHIPPED = [
    "fltac",
    "fedit",
    "oracle",
    "local",
    "fedmoe_da",
    "fedavg_moe",
    "fedavg_dense",
    "local_moe",
]


def test_every_shipped_method_resolves_to_its_code() -> None:
    assert methods.names()[: len(SHIPPED)] == SHIPPED
    for name in SHIPPED:
        method = methods.get(name)
        strategy = method.strategy_class()
        assert strategy.method == name  # the class says which method its records come from
        assert callable(strategy.from_config)
        handlers = method.client_handlers()
        assert callable(handlers.train) and callable(handlers.evaluate)
        assert callable(method.server_run())


def test_each_method_config_selects_its_registered_method() -> None:
    for name in SHIPPED:
        assert load_config(f"method={name}").method.name == name
    assert load_config("method=fedmoe_da_p0").method.name == "fedmoe_da"


def test_what_each_moe_method_shares_through_the_server() -> None:
    shares = {n: methods.get(n).shares for n in SHIPPED if methods.get(n).family == "moe"}
    assert shares == {
        "fedmoe_da": ("backbone",),
        "fedavg_moe": ("backbone", "gate", "experts"),
        "fedavg_dense": ("backbone", "head"),
        "local_moe": (),
    }


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (Method("x", "graphs", "m:C", "?"), "family"),
        (Method("x", "adapters", "m:C", "?", model="cnn"), "model"),
        (Method("x", "adapters", "m.C", "?"), "module:Class"),
        (Method("x", "adapters", "m:C", "?", adapters="some"), "adapters"),
        (Method("fltac", "adapters", "m:C", "?"), "already registered"),
    ],
)
def test_bad_entries_are_refused(entry: Method, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        register(entry)
    assert methods.get("fltac").strategy == "strategies.fltac:TaskAdapterClustering"


def test_an_unknown_method_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="fedmoe_da"):
        methods.get("fedprox")
