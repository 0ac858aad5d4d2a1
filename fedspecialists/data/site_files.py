"""Write a partitioned benchmark as each site's own files: the bring-your-own-data layout.

A deployment's sites hold their data in files under the folder their node config names as
``data-dir`` (``conf/suite/site_images.yaml``, ``conf/suite/site_text.yaml``). This module
writes the offline benchmarks' partitions in that layout, so the path can be tried (and tested)
on real data: site ``i`` gets partition ``i`` of ``num_sites``.

* Images: per domain, PNG files and a CSV of ``image`` (path relative to the CSV) and ``label``
  (the class name).
* Text: per task, a CSV of ``text`` and ``label`` (the class name).

A site gets a task's file only where its partition holds examples of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from fedspecialists.config import load_config
from fedspecialists.data.domains import load_domains, suite_partition
from fedspecialists.data.tasks import as_task_spec, client_tasks, load_suite


def export_sites(overrides: str, site_suite: str, out: str | Path, num_sites: int) -> list[Path]:
    """Write partition ``i`` of the suite of ``overrides`` to ``out/site<i>``.

    Parameters
    ----------
    overrides
        The source experiment (Hydra overrides): its suite, partition settings and seed.
    site_suite
        The ``conf/suite`` entry whose ``data_files`` and ``label_names`` the files follow; its
        task names must be the source suite's.
    out
        Parent folder of the sites' folders.
    num_sites
        Number of sites (= partitions).

    Returns
    -------
    list of Path
        The sites' folders (each one a SuperNode's ``data-dir``).
    """
    cfg = load_config(overrides)
    template = {
        str(t.name): as_task_spec(t) for t in load_config(f"suite={site_suite}").suite.tasks
    }
    missing = sorted({str(t.name) for t in cfg.suite.tasks} - set(template))
    if missing:
        raise ValueError(f"suite '{site_suite}' has no task named {missing}")
    sites = [Path(out).expanduser().resolve() / f"site{i}" for i in range(num_sites)]
    kinds = {str(t.kind) for t in cfg.suite.tasks}
    if kinds == {"image_classification"}:
        _export_images(cfg, template, sites)
    elif kinds == {"text_classification"}:
        _export_text(cfg, template, sites)
    else:
        raise ValueError(f"export writes all-image or all-text suites, not {sorted(kinds)}")
    return sites


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


def _export_images(cfg: Any, template: dict[str, Any], sites: list[Path]) -> None:
    domains = load_domains(cfg)
    for i, site in enumerate(sites):
        data = suite_partition(cfg, i, len(sites))
        for d, domain in enumerate(domains):
            spec = template[domain.name]
            names = list(spec.label_names)
            for split in ("train", "test"):
                keep = getattr(data, f"d_{split}") == d
                if not keep.any():
                    continue
                csv = site / spec.data_files[split]
                images = getattr(data, f"x_{split}")[keep]
                labels = getattr(data, f"y_{split}")[keep]
                (csv.parent / split).mkdir(parents=True, exist_ok=True)
                rows = []
                for j, (image, label) in enumerate(zip(images, labels, strict=True)):
                    png = Path(split) / f"{j:05d}.png"
                    pixels = np.clip(np.rint(image[0] * 255.0), 0, 255).astype(np.uint8)
                    Image.fromarray(pixels, mode="L").save(csv.parent / png)
                    rows.append((str(png), names[int(label)]))
                _write_csv(csv, pd.DataFrame(rows, columns=["image", "label"]))


def _export_text(cfg: Any, template: dict[str, Any], sites: list[Path]) -> None:
    tasks = load_suite(cfg.suite.tasks, cfg.seed, cfg.data.cache_dir)
    for task in tasks:
        declared = list(template[task.name].label_names or [])
        if declared != task.label_names:
            raise ValueError(
                f"task '{task.name}': the site suite's label_names {declared} are not the "
                f"data's {task.label_names}"
            )
    for i, site in enumerate(sites):
        mine = client_tasks(
            tasks, i, len(sites), cfg.partition.alpha, cfg.partition.min_share, cfg.seed
        )
        for held in mine:
            spec = template[held.name]
            names = tasks[held.task_index].label_names
            for split in ("train", "test"):
                ds = getattr(held, split)
                if len(ds) == 0:
                    continue
                frame = pd.DataFrame(
                    {"text": ds["text"], "label": [names[int(y)] for y in ds["label"]]}
                )
                _write_csv(site / spec.data_files[split], frame)
