"""What a run leaves behind: its folder, per-round metrics, summary, plots and final adapters.

Layout of a run folder::

    config.yaml          resolved experiment config
    metrics.jsonl        one JSON object per round (accuracy per task, loss, bytes, agreement, time)
    embeddings.jsonl     per round: 2-D PCA of every uploaded adapter, its true task and group
    summary.json         method, final per-task and mean accuracy, total bytes, agreement per round
    plots/*.png          accuracy per task, cumulative bytes, adapter embeddings per round
    adapters/<id>/       final global adapters as peft folders (PeftModel.from_pretrained loads)
    status.json          "running" (with a heartbeat) / "completed" / "failed" (with the error);
                         read as "interrupted" when the heartbeat stops (fedspecialists.run.status)
    checkpoint/          the last completed round's strategy state (resume=<this folder>)

Mixture-of-experts runs (FedMoE-DA and its baselines) write instead of adapters::

    aggregation.jsonl    per recompute: FedMoE-DA's correlation R and aggregation matrix A
    shared_model.safetensors   final parameters aggregated through the server
    nodes/node-<id>/run-<run id>/personal.safetensors   each client's final personal parts
    plots/               personalised/global accuracy, server vs peer bytes, A, routing
"""

from __future__ import annotations

import json
import math
import time
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log
from omegaconf import OmegaConf

from fedspecialists.config import (
    AdapterRunConfig,
    ConfigError,
    ExperimentConfig,
    MoERunConfig,
    load_config,
    to_yaml,
)
from fedspecialists.run.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedspecialists.run.status import StatusFile, atomic_write
from server_app.tracking import TensorBoardTracker


def run_setting(cfg: ExperimentConfig) -> str:
    """The setting a run folder's name carries: the LoRA rank, or FedMoE-DA's P."""
    if isinstance(cfg, AdapterRunConfig):
        return f"r{cfg.lora.rank}"
    if isinstance(cfg, MoERunConfig):
        return f"P{cfg.fedmoe_da.num_peers}"
    return "-"


def run_dir_for(cfg: ExperimentConfig) -> Path:
    """Absolute run folder (the ServerApp's working directory is wherever the SuperLink started)."""
    root = Path(str(cfg.output.root)).expanduser().resolve()
    setting = run_setting(cfg)
    name = cfg.output.name or (
        f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method.name}-{cfg.suite.name}-{setting}-s{cfg.seed}"
    )
    path = root / str(name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _flat_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """``cfg`` as ``config.yaml`` writes it, flattened to dotted keys."""
    return _flat(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))))


def _added_since(saved: dict[str, Any], now: dict[str, Any], cfg: ExperimentConfig) -> set[str]:
    """Keys a run folder written by an earlier release lacks that hold their default now: a
    setting added since, which changes nothing while it stays at its default."""
    missing = set(now) - set(saved)
    if not missing:
        return set()
    defaults = _flat_config(load_config(f"method={cfg.method.name}"))
    return {k for k in missing if k in defaults and defaults[k] == now[k]}


def resumed_run(cfg: ExperimentConfig) -> tuple[Path, Checkpoint]:
    """The run folder ``cfg.resume`` names and its last checkpoint, once its config is shown to
    be the run's own (``ConfigError`` naming every key that differs; ``num_rounds`` may grow)."""
    run_dir = Path(str(cfg.resume)).expanduser().resolve()
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        raise ConfigError(f"resume: {run_dir} is not a run folder (no config.yaml)")
    saved = _flat(OmegaConf.to_container(OmegaConf.load(saved_path)))
    now = _flat_config(cfg)
    added = _added_since(saved, now, cfg)
    differ = sorted(
        k
        for k in set(saved) | set(now)
        if k not in ("resume", "num_rounds", *added) and saved.get(k) != now.get(k)
    )
    if differ:
        raise ConfigError(
            f"resume: the overrides give a config that differs from the run's in {differ}; "
            "give the same overrides as the run had, plus resume=<its folder>"
        )
    checkpoint = load_checkpoint(run_dir)
    if checkpoint.round > cfg.num_rounds:
        raise ConfigError(f"resume: the run is at round {checkpoint.round} > num_rounds")
    return run_dir, checkpoint


def privacy_summary(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """What local DP did to every trained update (``None`` without it)."""
    dp = cfg.privacy
    if not dp.local_dp:
        return None
    std = dp.noise_std()
    return {
        "mechanism": "flwr LocalDpMod, per trained update",
        "clipping_norm": dp.clipping_norm,
        "sensitivity": dp.sensitivity,
        "epsilon": dp.epsilon,
        "delta": dp.delta,
        "noise_std": std,
        "noise_multiplier": std / dp.clipping_norm,
    }


class RunRecorder:
    """Writes a run's files as the rounds go by.

    Resuming (``resumed``: the checkpoint to go on from), it keeps the files' rounds up to the
    checkpoint's (a round the crash cut short is dropped) and appends from there.
    """

    FILES = ("metrics.jsonl", "embeddings.jsonl", "aggregation.jsonl")

    def __init__(
        self, run_dir: Path, cfg: ExperimentConfig, resumed: Checkpoint | None = None
    ) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.resumed = resumed
        self.status = StatusFile(run_dir)
        kept = {name: self._kept_lines(name) for name in self.FILES}
        self.rounds: list[dict[str, Any]] = kept["metrics.jsonl"]
        self.embeddings: list[dict[str, Any]] = kept["embeddings.jsonl"]
        # Only the last round's A is plotted; each is hundreds of KB at thousands of experts.
        aggregations = kept["aggregation.jsonl"]
        self.last_aggregation: dict[str, Any] | None = aggregations[-1] if aggregations else None
        if resumed is None:
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        for name, lines in kept.items():
            atomic_write(run_dir / name, "".join(json.dumps(x) + "\n" for x in lines).encode())
        details = {} if resumed is None else {"resumed_after_round": resumed.round}
        self.tracker = (
            TensorBoardTracker(run_dir / "tensorboard", to_yaml(cfg))
            if cfg.output.tensorboard
            else None
        )
        self.set_status("running", **details)

    def _kept_lines(self, name: str) -> list[dict[str, Any]]:
        """A resumed run's lines of ``name`` up to the checkpoint's round (a new run: none)."""
        path = self.run_dir / name
        if self.resumed is None or not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [x for x in lines if int(x["round"]) <= self.resumed.round]

    def set_status(self, status: str, **details: Any) -> None:
        self.status.set(status, **details)
        if status != "running" and self.tracker is not None:
            self.tracker.close()

    def save_checkpoint(
        self, server_round: int, arrays: dict[str, np.ndarray], state: dict[str, Any]
    ) -> None:
        """The strategy's state after ``server_round`` (``checkpoint/``), named in the status."""
        save_checkpoint(self.run_dir, Checkpoint(server_round, arrays, state))
        (self.run_dir / "checkpoint").chmod(0o700)  # it holds the peer-grant signing key
        self.status.update(last_round=server_round)

    def on_round_end(self, record: dict[str, Any]) -> None:
        """Append the round to metrics.jsonl (embedding to embeddings.jsonl) and print progress."""
        record = dict(record)
        embedding = record.pop("embedding", None)
        aggregation = record.pop("aggregation", None)
        self.rounds.append(record)
        if aggregation is not None:
            entry = {"round": record["round"], **aggregation}
            self.last_aggregation = entry
            with (self.run_dir / "aggregation.jsonl").open("a") as f:
                f.write(json.dumps(entry) + "\n")
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log_round(record)
        if embedding is not None:
            entry = {"round": record["round"], **embedding}
            self.embeddings.append(entry)
            with (self.run_dir / "embeddings.jsonl").open("a") as f:
                f.write(json.dumps(entry) + "\n")
        if "personalised_accuracy" in record:
            self._log_moe_round(record)
            return
        acc = record.get("accuracy", {})
        per_task = " ".join(f"{k}={v:.3f}" for k, v in acc.items())
        cum = record.get("bytes", {}).get("cumulative", {})
        ari = record.get("clustering_agreement")
        mean = record.get("mean_accuracy")
        log(
            INFO,
            "[round %s/%s] mean acc %s | %s | loss %s | ARI %s | up %s down %s (train, cumulative) "
            "| %.1fs | %s",
            record["round"],
            self.cfg.num_rounds,
            f"{mean:.3f}" if mean is not None else "n/a",
            per_task,
            f"{record['train_loss']:.3f}" if record.get("train_loss") is not None else "n/a",
            f"{ari:.3f}" if ari is not None else "n/a",
            _human(cum.get("train_up", 0)),
            _human(cum.get("train_down", 0)),
            record.get("round_time_s", 0.0),
            self.time_left(record),
        )

    def _log_moe_round(self, record: dict[str, Any]) -> None:
        personal = record.get("personalised_accuracy", {})
        cum = record.get("bytes", {}).get("cumulative", {})
        server = cum.get("train_up", 0) + cum.get("train_down", 0)
        log(
            INFO,
            "[round %s/%s] personalised acc %s +- %s | global acc %s | loss %s | server %s, "
            "peers %s (train, cumulative) | peer failures %s | %.1fs | %s",
            record["round"],
            self.cfg.num_rounds,
            _fmt(personal.get("mean")),
            _fmt(personal.get("std")),
            _fmt(record.get("global_accuracy", {}).get("mean")),
            _fmt(record.get("train_loss")),
            _human(server),
            _human(record.get("peer_bytes", {}).get("cumulative", 0)),
            record.get("peer_failures", 0),
            record.get("round_time_s", 0.0),
            self.time_left(record),
        )

    def _track_plots(self, paths: list[Path]) -> None:
        if self.tracker is not None:
            self.tracker.log_plots(paths, step=int(self.rounds[-1]["round"]) if self.rounds else 0)

    def time_left(self, record: dict[str, Any]) -> str:
        """The run's estimated time left after ``record``'s round: the mean round time of the
        rounds so far times the rounds to go."""
        return time_left_text(
            [float(r.get("round_time_s", 0.0)) for r in self.rounds],
            self.cfg.num_rounds - int(record["round"]),
        )

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        last = self.rounds[-1] if self.rounds else {}
        cum = last.get("bytes", {}).get("cumulative", {})
        round_times = [r.get("round_time_s", 0.0) for r in self.rounds]
        summary = {
            "method": self.cfg.method.name,
            "suite": self.cfg.suite.name,
            "seed": self.cfg.seed,
            # null for the MoE methods, which train no LoRA adapter
            "lora_rank": self.cfg.lora.rank if isinstance(self.cfg, AdapterRunConfig) else None,
            "num_rounds": len(self.rounds),
            "per_task_accuracy": last.get("accuracy", {}),
            "mean_accuracy": last.get("mean_accuracy"),
            "total_bytes_up": int(cum.get("train_up", 0)),
            "total_bytes_down": int(cum.get("train_down", 0)),
            "total_bytes_eval_up": int(cum.get("evaluate_up", 0)),
            "total_bytes_eval_down": int(cum.get("evaluate_down", 0)),
            "clustering_agreement_per_round": [r.get("clustering_agreement") for r in self.rounds],
            "seconds_per_round": (sum(round_times) / len(round_times)) if round_times else None,
            "wall_time_s": last.get("wall_time_s"),
            "privacy": privacy_summary(self.cfg),
            **extra,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def write_plots(self) -> list[Path]:
        """PNG plots: accuracy per task over rounds, cumulative bytes, adapter embeddings."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = self.run_dir / "plots"
        out.mkdir(exist_ok=True)
        written: list[Path] = []
        rounds = [r["round"] for r in self.rounds]
        tasks = sorted({t for r in self.rounds for t in r.get("accuracy", {})})
        method = self.cfg.method.name
        evaluated = [
            r for r in self.rounds if r.get("evaluated", True)
        ]  # federation.evaluate_every
        if evaluated and tasks:
            fig, ax = plt.subplots(figsize=(6, 4))
            at = [r["round"] for r in evaluated]
            for task in tasks:
                ax.plot(
                    at,
                    [r.get("accuracy", {}).get(task, np.nan) for r in evaluated],
                    "o-",
                    label=task,
                )
            means = [r.get("mean_accuracy") or np.nan for r in evaluated]
            ax.plot(at, means, "k--", label="mean")
            ax.set(xlabel="round", ylabel="test accuracy", title=f"{method}: accuracy per task")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            written.append(_save(fig, out / "accuracy_per_task.png"))
        if rounds:
            fig, ax = plt.subplots(figsize=(6, 4))
            for key, label in (("train_up", "up (train)"), ("train_down", "down (train)")):
                values = [
                    r.get("bytes", {}).get("cumulative", {}).get(key, 0) / 1e6 for r in self.rounds
                ]
                ax.plot(rounds, values, "o-", label=label)
            ax.set(xlabel="round", ylabel="cumulative MB", title=f"{method}: communication")
            ax.legend()
            ax.grid(alpha=0.3)
            written.append(_save(fig, out / "cumulative_bytes.png"))
        if self.embeddings:
            n = len(self.embeddings)
            cols = min(n, 4)
            rows_n = math.ceil(n / cols)
            fig, axes = plt.subplots(
                rows_n, cols, figsize=(3.2 * cols, 3.0 * rows_n), squeeze=False
            )
            names = sorted({t for e in self.embeddings for t in e["task"]})
            colours = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(names)}
            markers = "osD^v<>p*hX"
            for ax, emb in zip(axes.ravel(), self.embeddings, strict=False):
                groups = sorted(set(emb["group"]))
                for x, y, task, group in zip(
                    emb["x"], emb["y"], emb["task"], emb["group"], strict=True
                ):
                    ax.scatter(
                        x,
                        y,
                        color=colours[task],
                        marker=markers[groups.index(group) % len(markers)],
                        s=22,
                    )
                ax.set_title(f"round {emb['round']}", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
            for ax in axes.ravel()[n:]:
                ax.axis("off")
            handles = [
                plt.Line2D([], [], color=colours[t], marker="o", linestyle="", label=t)
                for t in names
            ]
            fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 5), fontsize=8)
            fig.suptitle(
                f"{method}: uploaded adapters (PCA of clustering features)\n"
                "colour = true task, marker = group",
                fontsize=9,
            )
            fig.tight_layout(rect=(0, 0.06, 1, 0.95))
            written.append(_save(fig, out / "adapter_embeddings.png"))
        self._track_plots(written)
        return written

    def write_moe_plots(
        self, domains: list[str], num_experts: int, private_experts: int = 0
    ) -> list[Path]:
        """PNG plots of a mixture-of-experts run: accuracy, server vs peer bytes, A, routing
        (over the ``num_experts`` shared experts, then the ``private_experts``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = self.run_dir / "plots"
        out.mkdir(exist_ok=True)
        written: list[Path] = []
        method = self.cfg.method.name
        rounds = [r["round"] for r in self.rounds if "personalised_accuracy" in r]
        evaluated = [r for r in self.rounds if "personalised_accuracy" in r]
        if rounds:
            mean = np.array([r["personalised_accuracy"]["mean"] or np.nan for r in evaluated])
            std = np.array([r["personalised_accuracy"]["std"] or 0.0 for r in evaluated])
            glob = [r["global_accuracy"]["mean"] or np.nan for r in evaluated]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(rounds, mean, "o-", label="personalised (own test split)")
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
            ax.plot(rounds, glob, "s--", label="global test set")
            ax.set(xlabel="round", ylabel="accuracy", title=f"{method}: accuracy (mean, +-1 std)")
            ax.legend()
            ax.grid(alpha=0.3)
            written.append(_save(fig, out / "accuracy.png"))

            fig, ax = plt.subplots(figsize=(6, 4))
            cum = [r.get("bytes", {}).get("cumulative", {}) for r in evaluated]
            ax.plot(
                rounds,
                [(c.get("train_down", 0) + c.get("train_up", 0)) / 1e6 for c in cum],
                "o-",
                label="through the server (train, up + down)",
            )
            ax.plot(
                rounds,
                [r.get("peer_bytes", {}).get("cumulative", 0) / 1e6 for r in evaluated],
                "s-",
                label="between peers (experts)",
            )
            ax.set(xlabel="round", ylabel="cumulative MB", title=f"{method}: server vs peer bytes")
            ax.legend()
            ax.grid(alpha=0.3)
            written.append(_save(fig, out / "server_vs_peer_bytes.png"))
        if (last := self.last_aggregation) is not None:
            matrix, ids = _plotted_matrix(last)
            fig, ax = plt.subplots(figsize=(6.4, 5.6))
            image = ax.imshow(matrix, cmap="viridis", vmin=0)
            owners = [i.split("/")[0] for i in ids]
            starts = [j for j in range(len(ids)) if j == 0 or owners[j] != owners[j - 1]]
            for j in starts[1:]:
                ax.axhline(j - 0.5, color="w", lw=0.4)
                ax.axvline(j - 0.5, color="w", lw=0.4)
            ax.set_xticks(starts, [f"n{k}" for k in range(len(starts))], fontsize=7)
            ax.set_yticks(starts, [f"n{k}" for k in range(len(starts))], fontsize=7)
            ax.set(
                xlabel="source expert j (by client)",
                ylabel="expert i (by client)",
                title=f"aggregation matrix A, round {last['round']} (Eq. 10)"
                + ("" if len(ids) == len(last["expert_ids"]) else f", first {len(ids)} experts"),
            )
            fig.colorbar(image, ax=ax, shrink=0.8, label="a_ij")
            written.append(_save(fig, out / "aggregation_matrix.png"))
        routed = [r for r in self.rounds if r.get("routing")]
        if routed:
            names = [f"expert {k}" for k in range(num_experts)]
            names += [f"private {j}" for j in range(private_experts)]
            counts = np.asarray(routed[-1]["routing"], dtype=float).reshape(
                len(domains), len(names)
            )
            share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
            fig, ax = plt.subplots(figsize=(5.5, 3.6))
            image = ax.imshow(share, cmap="magma", vmin=0, vmax=1)
            ax.set_xticks(range(len(names)), names, rotation=45 if private_experts else 0)
            ax.set_yticks(range(len(domains)), domains)
            for (i, j), value in np.ndenumerate(share):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w" if value < 0.6 else "k",
                )
            ax.set_title(
                f"{method}: where each domain is routed (round {routed[-1]['round']},\n"
                "share of top-k assignments on clients' own test data)",
                fontsize=9,
            )
            fig.colorbar(image, ax=ax, shrink=0.8)
            fig.tight_layout()
            written.append(_save(fig, out / "routing_by_domain.png"))
        self._track_plots(written)
        return written


def save_adapters(
    run_dir: Path,
    cfg: AdapterRunConfig,
    num_labels: int,
    adapters: dict[str, dict[str, Any]],
    names: dict[str, str],
) -> list[Path]:
    """Save final global adapters as peft folders under ``adapters/<id>/``.

    ``names`` maps an adapter id to a readable label (its majority true task in simulation) that
    is written to ``adapters/index.json``.
    """
    if not adapters:
        return []
    import torch
    from peft import get_peft_model, set_peft_model_state_dict

    from fedspecialists.models.lora import build_base_model, lora_config, suite_kind

    kind = suite_kind(cfg)
    torch.manual_seed(cfg.seed)
    base = build_base_model(cfg.model, kind, num_labels)
    ids = sorted(adapters)
    lcfg = lora_config(cfg, kind, base)
    model = get_peft_model(base, lcfg, adapter_name=ids[0])
    for gid in ids[1:]:
        model.add_adapter(gid, lcfg)
    out = run_dir / "adapters"
    paths = []
    for gid in ids:
        state = {k: torch.as_tensor(v) for k, v in adapters[gid].items()}
        set_peft_model_state_dict(model, state, adapter_name=gid)
    # peft writes adapter "x" to <dir>/x for every adapter but the first name "default".
    model.save_pretrained(str(out), selected_adapters=ids)
    for gid in ids:
        paths.append(out / gid if (out / gid).exists() else out)
    (out / "index.json").write_text(
        json.dumps(
            {
                gid: {"path": str(p.relative_to(run_dir)), "majority_true_task": names.get(gid)}
                for gid, p in zip(ids, paths, strict=True)
            },
            indent=2,
        )
    )
    return paths


def time_left_text(times: list[float], to_go: int) -> str:
    """``"about 4 min left"`` from the times so far and the steps to go (``"done"`` at 0)."""
    if to_go <= 0:
        return "done"
    if not times:
        return "time left unknown"
    seconds = sum(times) / len(times) * to_go
    if seconds < 90:
        return f"about {seconds:.0f} s left"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min left"
    return f"about {seconds / 3600:.1f} h left"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.1f}{unit}" if unit != "B" else f"{int(nbytes)}B"
        nbytes /= 1000
    return f"{nbytes:.1f}GB"


def _plotted_matrix(aggregation: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """A as a dense array for the plot, with its expert ids: in full where the record has it,
    else the first ``DENSE_RECORD_LIMIT`` experts' block, from the kept entries."""
    from scipy import sparse

    from strategies.fedmoe_da import DENSE_RECORD_LIMIT

    ids = list(aggregation["expert_ids"])
    if "matrix" in aggregation:
        return np.asarray(aggregation["matrix"]), ids
    kept = aggregation["matrix_sparse"]
    a = sparse.csr_matrix(
        (kept["data"], kept["indices"], kept["indptr"]), shape=(len(ids), len(ids))
    )
    n = min(len(ids), DENSE_RECORD_LIMIT)
    return a[:n, :n].toarray(), ids[:n]
