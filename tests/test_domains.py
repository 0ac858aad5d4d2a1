"""Multi-domain image data and the Dirichlet mixture of domains and labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedspecialists.domains import (
    DomainData,
    DomainMixture,
    client_domains,
    domain_mixture_partition,
    global_test_set,
    load_domain,
    mixture_counts,
    mixture_shares,
)


def test_mixture_counts_by_hand() -> None:
    mixture = DomainMixture(
        domain_shares=np.array([[0.75, 0.25]]),
        label_shares=[np.array([[0.5, 0.5]]), np.array([[0.1, 0.9]])],
    )
    counts = mixture_counts(mixture, 0, 8)
    # 8 * (.75, .25) = (6, 2); domain 0: 6 * (.5, .5) = (3, 3); domain 1: 2 * (.1, .9) = (.2, 1.8)
    # -> floor (0, 1), one left over to the larger remainder (.8 of label 1) -> (0, 2).
    assert [c.tolist() for c in counts] == [[3, 3], [0, 2]]


def test_partition_is_disjoint_and_follows_the_counts() -> None:
    labels = [np.repeat(np.arange(3), 200), np.repeat(np.arange(2), 200)]  # never runs out
    mixture = mixture_shares(5, [3, 2], domain_alpha=0.5, label_alpha=0.5, seed=0)
    parts = domain_mixture_partition(labels, mixture, per_client=40, seed=1, disjoint=True)
    for d in range(2):
        taken = np.concatenate([parts[n][d] for n in range(5)])
        assert len(taken) == len(set(taken.tolist()))  # no example in two clients
    for n in range(5):
        counts = mixture_counts(mixture, n, 40)
        for d in range(2):
            got = np.bincount(labels[d][parts[n][d]], minlength=len(counts[d]))
            assert got.tolist() == counts[d].tolist()


def test_small_alpha_concentrates_domains() -> None:
    skewed = mixture_shares(50, [10] * 4, domain_alpha=0.05, label_alpha=1.0, seed=0)
    flat = mixture_shares(50, [10] * 4, domain_alpha=100.0, label_alpha=1.0, seed=0)
    assert skewed.domain_shares.max(axis=1).mean() > 0.9
    assert flat.domain_shares.max(axis=1).mean() < 0.35


def _domain(name: str, n: int, labels: int, value: float) -> DomainData:
    y = np.arange(n) % labels
    x = np.full((n, 1, 4, 4), value, np.float32)
    return DomainData(name, labels, x, y, x[: n // 2], y[: n // 2])


def test_client_domains_tags_every_example_with_its_domain() -> None:
    domains = [_domain("a", 400, 5, 0.0), _domain("b", 400, 5, 1.0)]
    data = client_domains(domains, 1, 4, 0.5, 0.5, 30, 20, seed=0)
    assert len(data.y_train) == 30 and len(data.y_test) == 20
    # Inputs of domain b are all ones, of a all zeros: the domain tag must match.
    assert np.array_equal(data.x_train.reshape(30, -1)[:, 0], data.d_train.astype(np.float32))
    x, y, d = global_test_set(domains, per_domain=10, seed=0)
    assert np.bincount(d).tolist() == [10, 10] and len(x) == len(y) == 20


def test_sklearn_digits_become_28x28_in_unit_range(tmp_path: Path) -> None:
    spec = {
        "name": "digits",
        "kind": "image_classification",
        "source": "builtin",
        "builtin": "sklearn_digits",
        "max_train_examples": 300,
        "max_test_examples": 100,
    }
    domain = load_domain(spec, 0, tmp_path)
    assert domain.x_train.shape == (300, 1, 28, 28) and domain.x_test.shape == (100, 1, 28, 28)
    assert domain.x_train.min() >= 0.0 and domain.x_train.max() <= 1.0
    assert domain.num_labels == 10
    again = load_domain(spec, 0, tmp_path)  # from the npz cache
    assert np.array_equal(again.x_train, domain.x_train)


@pytest.mark.parametrize("builtin", ["mnist", "fashion_mnist", "animal_silhouettes"])
def test_offline_image_domains_load(builtin: str, tmp_path: Path) -> None:
    from fedspecialists.data import default_cache_dir

    spec = {
        "name": builtin,
        "kind": "image_classification",
        "source": "builtin",
        "builtin": builtin,
        "max_train_examples": 500,
        "max_test_examples": 200,
    }
    # The wheels live in the project's cache (scripts/fetch_data.py); the npz goes to tmp.
    wheels = default_cache_dir() / "wheels"
    (tmp_path / "wheels").symlink_to(wheels)
    domain = load_domain(spec, 0, tmp_path)
    assert domain.x_train.shape == (500, 1, 28, 28)
    assert domain.num_labels == 10
    assert len(np.unique(domain.y_train)) == 10
    assert 0.05 < float(domain.x_train.mean()) < 0.6  # real pictures, not blanks


def test_hub_colour_images_become_channels_first(tmp_path: Path) -> None:
    """The CIFAR path (hub / local dataset folder) on an 8x8 RGB stand-in."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar_like"
    folder.mkdir()
    for split, n in (("train", 40), ("test", 10)):
        pixels = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
        ds = datasets.Dataset.from_dict(
            {"img": [Image.fromarray(p) for p in pixels], "label": [i % 4 for i in range(n)]}
        ).cast_column("img", datasets.Image())
        ds.to_parquet(str(folder / f"{split}.parquet"))
        if split == "test":
            expected = pixels[0].transpose(2, 0, 1) / 255.0
    spec = {
        "name": "cifar",
        "kind": "image_classification",
        "source": "hub",
        "path": str(folder),
        "image_column": "img",
    }
    domain = load_domain(spec, 0, tmp_path)
    assert domain.x_train.shape == (40, 3, 8, 8) and domain.x_test.shape == (10, 3, 8, 8)
    assert domain.num_labels == 4
    # The test split keeps its order: the first test image, channels first, scaled to [0, 1].
    assert np.allclose(domain.x_test[0], expected, atol=1e-6)
