"""TensorBoard event files beside a run's own files (``output.tensorboard=true``).

Per round, every number of the round's record (accuracies, losses, clustering agreement, bytes,
times; nothing per node) as a scalar at step = round; at the start, the resolved config as text;
at the end, every plot as an image. They go to ``<run folder>/tensorboard/``:
``tensorboard --logdir <output.root>`` shows every run side by side. The run folder's own files
stay what ``fedspecialists-report`` and users' scripts read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SKIPPED = ("per_node", "cumulative_per_node", "embedding", "aggregation")  # per node, or big


def round_scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a round record, flattened to ``a/b/c`` tags (booleans, lists, strings
    and per-node breakdowns left out)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in SKIPPED or key == "round":
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(round_scalars(value, f"{tag}/"))
        elif _is_number(value):
            out[tag] = float(value)
    return out


class TensorBoardTracker:
    """Writes one run's event files (``torch.utils.tensorboard``, imported only when used)."""

    def __init__(self, folder: Path, config_yaml: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))
        self.writer.add_text("config", "```yaml\n" + config_yaml + "\n```", global_step=0)
        self.writer.flush()

    def log_round(self, record: Mapping[str, Any]) -> None:
        step = int(record["round"])
        for tag, value in round_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def log_plots(self, paths: Iterable[Path], step: int) -> None:
        import matplotlib.image

        for path in paths:
            image = matplotlib.image.imread(str(path))  # (H, W, 3 or 4) floats in [0, 1]
            self.writer.add_image(f"plots/{path.stem}", image[..., :3], step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _is_number(value: Any) -> bool:
    """A finite int or float (a bool is neither here)."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return is_number and math.isfinite(float(value))
