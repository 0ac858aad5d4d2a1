"""The registry of federated methods: one entry per method names everything the apps need.

A method belongs to a *family*: the methods of one family share a ClientApp path (what a node
does with a message), a ServerApp path (how a run is set up and written) and the config sections
they read. Today there are two families:

* ``adapters``: LoRA adapters per task on a pre-trained model (FL-TAC and its baselines),
  ClientApp :mod:`client_app.fltac`, ServerApp :mod:`server_app.fltac`, sections ``lora``,
  ``fltac``;
* ``moe``: mixtures of experts (FedMoE-DA and its baselines), ClientApp
  :mod:`client_app.fedmoe_da`, ServerApp :mod:`server_app.fedmoe_da`, sections ``moe``,
  ``fedmoe_da``, ``peer``.

An entry names its strategy class and what the server aggregates; the class reads its own
settings (``from_config``). Everything is referred to by ``"module:attribute"`` and imported on
first use, so a ClientApp of one family never imports the other family's libraries.

Adding a method is its own files plus one :func:`register` call: in this module for a method that
ships with the project, or in a module of your own listed in ``method.plugins`` (imported before
the method is looked up, in every process of the run). See ``docs/extending.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

MODELS = ("lora", "moe", "dense")


@dataclass(frozen=True)
class Family:
    """What the methods of one family share.

    Attributes
    ----------
    name : str
        ``adapters`` or ``moe``.
    client : str
        Module whose ``train(msg, context)`` and ``evaluate(msg, context)`` handle messages.
    server : str
        ``"module:function"`` that runs the rounds and writes the run folder:
        ``run(grid, cfg, recorder, run_dir)``.
    sections : tuple[str, ...]
        Config sections only this family reads; a run records only its own family's sections.
    """

    name: str
    client: str
    server: str
    sections: tuple[str, ...]


@dataclass(frozen=True)
class Method:
    """One federated method.

    Attributes
    ----------
    name : str
        ``method.name`` in the config.
    family : str
        A key of :data:`FAMILIES`.
    strategy : str
        ``"module:Class"`` of its Flower strategy; the class has a ``from_config`` constructor.
    description : str
        One line for tables and ``--help``.
    model : str
        What a client trains: ``lora`` (adapters), ``moe`` (mixture of experts) or ``dense``.
    shares : tuple[str, ...]
        What the server aggregates: model parts (``backbone``, ``gate``, ``experts``, ``head``)
        for the MoE family; ``adapters`` (per task) or ``adapter`` (one shared) for adapters.
    needs_true_tasks : bool
        The method reads clients' true task labels (``report_true_tasks`` must be on).
    adapters : str
        Adapters family: ``per_task`` (one adapter per local task) or ``shared`` (one adapter
        trained on all of a client's tasks, FedIT).
    """

    name: str
    family: str
    strategy: str
    description: str
    model: str = "lora"
    shares: tuple[str, ...] = ()
    needs_true_tasks: bool = False
    adapters: str = "per_task"

    @property
    def family_spec(self) -> Family:
        return FAMILIES[self.family]

    def strategy_class(self) -> Any:
        """The strategy class (imported now)."""
        return load(self.strategy)

    def client_handlers(self) -> ModuleType:
        """The module handling this method's ClientApp messages (imported now)."""
        return importlib.import_module(self.family_spec.client)

    def server_run(self) -> Any:
        """The ServerApp function running this method's rounds (imported now)."""
        return load(self.family_spec.server)


FAMILIES: dict[str, Family] = {
    "adapters": Family(
        "adapters", "client_app.fltac", "server_app.fltac:run", sections=("lora", "fltac")
    ),
    "moe": Family(
        "moe",
        "client_app.fedmoe_da",
        "server_app.fedmoe_da:run",
        sections=("moe", "fedmoe_da", "peer"),
    ),
}

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (again with the same entry is a no-op).

    Raises
    ------
    ValueError
        On an unknown family or model, or a different entry under a name already taken.
    """
    if method.family not in FAMILIES:
        raise ValueError(f"method {method.name!r}: family must be one of {sorted(FAMILIES)}")
    if method.model not in MODELS:
        raise ValueError(f"method {method.name!r}: model must be one of {MODELS}")
    if method.adapters not in ("per_task", "shared"):
        raise ValueError(f"method {method.name!r}: adapters must be 'per_task' or 'shared'")
    if ":" not in method.strategy:
        raise ValueError(f"method {method.name!r}: strategy must read 'module:Class'")
    known = _REGISTRY.get(method.name)
    if known is not None and known != method:
        raise ValueError(f"a different method is already registered as {method.name!r}")
    _REGISTRY[method.name] = method
    return method


def load_plugins(modules: Iterable[str]) -> None:
    """Import each module of ``method.plugins`` (each calls :func:`register` when imported)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"method.plugins: cannot import {name!r}: {exc}") from exc


def get(name: str) -> Method:
    """The registered method ``name``; ``KeyError`` names the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(names())}") from None


def names() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def load(reference: str) -> Any:
    """The attribute a ``"module:attribute"`` reference names."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


for _method in (
    Method(
        "fltac",
        "adapters",
        "strategies.fltac:TaskAdapterClustering",
        "FL-TAC: per-task LoRA adapters clustered on the server",
        shares=("adapters",),
    ),
    Method(
        "fedit",
        "adapters",
        "strategies.baselines:FedIT",
        "FedIT: FedAvg over one shared LoRA adapter",
        shares=("adapter",),
        adapters="shared",
    ),
    Method(
        "oracle",
        "adapters",
        "strategies.baselines:OracleClustering",
        "FL-TAC's aggregation grouped by the true task",
        shares=("adapters",),
        needs_true_tasks=True,
    ),
    Method(
        "local",
        "adapters",
        "strategies.baselines:LocalOnly",
        "local only: per-task adapters, nothing aggregated",
    ),
    Method(
        "fedmoe_da",
        "moe",
        "strategies.fedmoe_da:DomainAwareMoEAggregation",
        "FedMoE-DA: backbone via the server, experts mixed peer to peer",
        model="moe",
        shares=("backbone",),
    ),
    Method(
        "fedavg_moe",
        "moe",
        "strategies.baselines:FedAvgMoE",
        "FedAvg on the whole MoE model",
        model="moe",
        shares=("backbone", "gate", "experts"),
    ),
    Method(
        "fedavg_dense",
        "moe",
        "strategies.baselines:FedAvgDense",
        "FedAvg on a dense model of similar size",
        model="dense",
        shares=("backbone", "head"),
    ),
    Method(
        "local_moe",
        "moe",
        "strategies.baselines:LocalMoE",
        "local only: each client's own MoE model, nothing exchanged",
        model="moe",
    ),
):
    register(_method)
