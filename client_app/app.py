"""The ClientApp: it hands each message to the handlers of the run's method.

* adapter methods (FL-TAC, FedIT, oracle, local only): :mod:`client_app.adapters`;
* mixture-of-experts methods (FedMoE-DA and its baselines): :mod:`client_app.moe`.

The handlers' modules are imported on first use: in a deployment every message starts a fresh
ClientApp process, so a FedMoE-DA message does not pay for importing peft and transformers.
"""

from __future__ import annotations

from types import ModuleType

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.node import config_for
from fedspecialists.config import MOE_METHODS

app = ClientApp()


def _handlers(context: Context) -> ModuleType:
    method = config_for(str(context.run_config.get("overrides", ""))).method.name
    if method in MOE_METHODS:
        from client_app import moe

        return moe
    from client_app import adapters

    return adapters


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One training round of the run's method on this node."""
    return _handlers(context).train(msg, context)  # type: ignore[no-any-return]


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """One evaluation round of the run's method on this node."""
    return _handlers(context).evaluate(msg, context)  # type: ignore[no-any-return]


__all__ = ["app"]
