"""The ClientApp: it hands each message to the handlers of the run's method.

The registry (:mod:`fedspecialists.methods`) names each method's handler module: FL-TAC and its
baselines use :mod:`client_app.fltac`, FedMoE-DA and its baselines :mod:`client_app.fedmoe_da`.
The handlers' modules are imported on first use: in a deployment every message starts a fresh
ClientApp process, so a FedMoE-DA message does not pay for importing peft and transformers.
"""

from __future__ import annotations

from types import ModuleType

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.faults import fault_mod
from client_app.fold import fold_evaluation
from client_app.node import client_id_of, config_for
from client_app.packing import packing_mod
from client_app.privacy import privacy_mod
from client_app.warm import trace_mod, warm_site_mod
from fedspecialists import methods
from fedspecialists.protocol.identity import IdentityReply


def _handlers(context: Context) -> ModuleType:
    # config_for imports the run's method.plugins, so a plugin method is registered here too.
    cfg = config_for(str(context.run_config.get("overrides", "")))
    return methods.get(cfg.method.name).client_handlers()


def _evaluate(msg: Message, context: Context) -> Message:
    reply: Message = _handlers(context).evaluate(msg, context)
    return reply


# Timing events outermost (FEDSPECIALISTS_TRACE), then a warm site's forwarder (the site runs
# the rest); then packed records in and out (federation.pack_arrays); then a folded
# evaluation, split into the two messages it stands for; then faults on purpose (an attacker
# skips DP), then local DP. All but packing do nothing unless asked for.
app = ClientApp(
    mods=[
        trace_mod,
        warm_site_mod,
        packing_mod,
        fold_evaluation(_evaluate),
        fault_mod,
        privacy_mod,
    ]
)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One training round of the run's method on this node."""
    reply: Message = _handlers(context).train(msg, context)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """One evaluation round of the run's method on this node."""
    return _evaluate(msg, context)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """This node's client id (see :mod:`fedspecialists.protocol.identity`); no model, no data."""
    return Message(content=IdentityReply(client_id_of(context)).to_record(), reply_to=msg)


__all__ = ["app"]
