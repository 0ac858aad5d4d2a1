"""The ServerApp: composes the experiment config and runs the method's ServerApp path.

The method's registry entry (:mod:`fedspecialists.methods`) names that path:
:func:`server_app.fltac.run` for FL-TAC and its baselines, :func:`server_app.fedmoe_da.run` for
FedMoE-DA and its baselines. Both build the strategy, run the rounds and write the run folder.
"""

from __future__ import annotations

import traceback
from logging import ERROR, INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedspecialists import methods
from fedspecialists.config import load_config
from fedspecialists.deploy.supernode import cap_pull_backoff
from server_app.outputs import RunRecorder, resumed_run, run_dir_for
from strategies.common import REPLY_POLL_S

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one experiment: config -> strategy -> rounds -> files."""
    cap_pull_backoff(REPLY_POLL_S)  # a reply's content is retried within the reply poll
    overrides = str(context.run_config.get("overrides", ""))
    cfg = load_config(overrides)  # refuses unknown keys / bad values before any training
    run_dir, checkpoint = resumed_run(cfg) if cfg.resume else (run_dir_for(cfg), None)
    recorder = RunRecorder(run_dir, cfg, checkpoint)
    log(
        INFO,
        "fedspecialists: method=%s suite=%s, writing to %s",
        cfg.method.name,
        cfg.suite.name,
        run_dir,
    )
    try:
        methods.get(cfg.method.name).server_run()(grid, cfg, recorder, run_dir)
    except Exception as exc:
        recorder.set_status("failed", error=repr(exc), traceback=traceback.format_exc())
        log(ERROR, "Run failed: %r (run folder %s)", exc, run_dir)
        raise


__all__ = ["app"]
