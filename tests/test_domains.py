"""Multi-domain image data and the Dirichlet mixture of domains and labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedspecialists.data.domains import (
    DomainData,
    DomainMixture,
    client_domains,
    conform_images,
    declared_model_input,
    domain_mixture_partition,
    global_test_set,
    load_cached,
    load_domain,
    load_domains,
    mixture_counts,
    mixture_shares,
    relabel,
    save_cached,
    site_domains,
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


def test_a_client_the_pools_ran_out_before_is_told_why() -> None:
    """100 + 100 training examples for 12 clients of 30: the first clients take them, and the
    last, left with none, fails with the setting to change (not with a NaN loss later)."""
    domains = [_domain("a", 100, 5, 0.0), _domain("b", 100, 5, 1.0)]
    assert len(client_domains(domains, 1, 12, 0.5, 0.5, 30, 20, seed=0).y_train) == 30
    with pytest.raises(ValueError, match=r"partition 11 holds no training.*train_per_client=30"):
        client_domains(domains, 11, 12, 0.5, 0.5, 30, 20, seed=0)


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
    from fedspecialists.data.tasks import default_cache_dir

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


# --------------------------------------------------------------------------------------------
# Sites' own image files (bring your own data) and sizing the model without data
# --------------------------------------------------------------------------------------------


def test_conform_images_by_hand() -> None:
    grey = np.array([[[[0.0, 1.0], [1.0, 0.0]]]], dtype=np.float32)  # (1, 1, 2, 2)
    assert conform_images(grey, None) is grey
    rgb = conform_images(grey, [3, 2, 2])
    assert rgb.shape == (1, 3, 2, 2)
    assert all(np.array_equal(rgb[0, c], grey[0, 0]) for c in range(3))
    red = np.zeros((1, 3, 1, 1), dtype=np.float32)
    red[0, 0] = 1.0
    assert conform_images(red, [1, 1, 1])[0, 0, 0, 0] == pytest.approx(0.299)  # ITU-R 601 luma
    # 2x2 -> 1x1 with an antialiased bilinear filter is the mean of the four pixels.
    assert conform_images(grey, [1, 1, 1])[0, 0, 0, 0] == pytest.approx(0.5)


def test_relabel_renames_classes_by_hand() -> None:
    x = np.zeros((4, 1), dtype=np.float32)
    domain = DomainData("d", 3, x, np.array([0, 1, 2, 2]), x[:2], np.array([2, 0]))
    assert relabel(domain, None) is domain
    moved = relabel(domain, [2, 0, 1])  # class 0 -> 2, 1 -> 0, 2 -> 1
    assert moved.y_train.tolist() == [2, 0, 1, 1]
    assert moved.y_test.tolist() == [1, 2]
    assert moved.x_train is x and moved.num_labels == 3
    assert domain.y_train.tolist() == [0, 1, 2, 2]  # the original is untouched
    with pytest.raises(ValueError, match="domain 'd': label_map"):
        relabel(domain, [1, 0])  # two entries for three classes


def test_the_conflict_suite_gives_one_image_two_labels(tmp_path: Path) -> None:
    from fedspecialists.config import load_config
    from fedspecialists.data.tasks import default_cache_dir

    (tmp_path / "wheels").symlink_to(default_cache_dir() / "wheels")  # npz files go to tmp
    cfg = load_config(f"+experiment=fedmoe_da_conflict data.cache_dir={tmp_path}")
    cfg.suite.tasks = cfg.suite.tasks[:2]  # mnist and mnist_relabelled
    for t in cfg.suite.tasks:
        t.max_train_examples, t.max_test_examples = 50, 20
    plain, renamed = load_domains(cfg)
    assert np.array_equal(plain.x_train, renamed.x_train)  # the same images ...
    assert np.array_equal(renamed.y_train, (plain.y_train + 5) % 10)  # ... other labels
    assert not np.any(renamed.y_test == plain.y_test)


def test_images_of_several_sizes_and_modes_are_conformed(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "scans"
    (folder / "img").mkdir(parents=True)
    Image.new("RGB", (12, 10), (255, 255, 255)).save(folder / "img" / "white.png")
    Image.new("L", (8, 8), 0).save(folder / "img" / "black.png")
    Image.new("L", (16, 16), 255).save(folder / "img" / "big.png")
    # Paths relative to the CSV's folder, labels by name.
    (folder / "train.csv").write_text(
        "image,label\nimg/white.png,benign\nimg/black.png,normal\nimg/big.png,benign\n"
    )
    spec = {
        "name": "scans",
        "kind": "image_classification",
        "source": "files",
        "data_files": {"train": str(folder / "train.csv"), "test": str(folder / "train.csv")},
        "label_names": ["normal", "benign", "malignant"],
        "image_shape": [1, 8, 8],
    }
    domain = load_domain(spec, 0, tmp_path / "cache")
    assert domain.x_train.shape == (3, 1, 8, 8)
    assert domain.num_labels == 3  # the declared classes, not just those present
    assert domain.y_train.tolist() == [1, 0, 1]
    assert np.allclose(domain.x_train[0], 1.0) and np.allclose(domain.x_train[1], 0.0)
    with pytest.raises(ValueError, match="image_shape"):
        load_domain({**spec, "image_shape": None}, 0, tmp_path / "cache")


def test_the_model_is_sized_from_the_specs_without_data(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from fedspecialists.config import load_config
    from fedspecialists.data import domains

    def no_data(*_: object, **__: object) -> None:
        raise AssertionError("data was loaded")

    monkeypatch.setattr(domains, "load_domain", no_data)
    monkeypatch.setattr(domains, "encode_text_domains", no_data)
    # The builtin image sets are known (28x28 grey, 10 classes); BYOD suites declare theirs.
    assert declared_model_input(load_config("method=fedmoe_da")) == ((1, 28, 28), 10)
    assert declared_model_input(load_config("method=fedmoe_da suite=site_images")) == (
        (1, 28, 28),
        10,
    )
    # Text: the frozen encoder's width from its config (tiny_bert: 32), the widest label set.
    text = load_config("method=fedmoe_da suite=site_text model=tiny_bert")
    assert declared_model_input(text) == ((32,), 5)

    def files(name: str, **extra: object) -> dict[str, object]:
        return {
            "name": name,
            "kind": "image_classification",
            "source": "files",
            "data_files": {"train": "x.csv"},
            **extra,
        }

    undeclared = SimpleNamespace(suite=SimpleNamespace(tasks=[files("a", label_names=["x"])]))
    assert declared_model_input(undeclared) is None  # no image_shape: read from the data
    clash = SimpleNamespace(
        suite=SimpleNamespace(
            tasks=[
                files("a", label_names=["x"], image_shape=[1, 8, 8]),
                files("b", label_names=["x"], image_shape=[3, 8, 8]),
            ]
        )
    )
    with pytest.raises(ValueError, match="one image_shape"):
        declared_model_input(clash)


def test_each_site_reads_its_partition_back_from_its_own_files(tmp_path: Path) -> None:
    """The export writes real partitions as PNG + CSV; each site's data-dir reads them back."""
    from fedspecialists.config import load_config
    from fedspecialists.data.site_files import export_sites

    overrides = "method=fedmoe_da partition.train_per_client=40 partition.test_per_client=20"
    sites = export_sites(overrides, "site_images", tmp_path / "sites", 3)
    cfg = load_config(overrides)
    site_cfg = load_config(f"method=fedmoe_da suite=site_images data.cache_dir={tmp_path}/cache")
    for i, site in enumerate(sites):
        part = client_domains(
            load_domains(cfg), i, 3, 0.5, 0.5, train_per_client=40, test_per_client=20, seed=0
        )
        own = site_domains(site_cfg, site)
        held = np.unique(own.d_train)  # a domain with no training file here is not held
        assert set(held) == set(np.unique(part.d_train))
        for split in ("train", "test"):
            keep = np.isin(getattr(part, f"d_{split}"), held)
            assert np.array_equal(getattr(own, f"d_{split}"), getattr(part, f"d_{split}")[keep])
            assert np.array_equal(getattr(own, f"y_{split}"), getattr(part, f"y_{split}")[keep])
            # The same pictures, up to PNG's 8 bits.
            assert np.allclose(
                getattr(own, f"x_{split}"), getattr(part, f"x_{split}")[keep], atol=0.5 / 255 + 1e-6
            )
    with pytest.raises(ValueError, match="no task of the suite"):
        site_domains(site_cfg, tmp_path / "empty")


def _write_many(path: str) -> None:
    for i in range(20):
        save_cached(Path(path), _domain("digits", 8, 3, float(i)))


def test_concurrent_processes_writing_one_cache_file_all_succeed(tmp_path: Path) -> None:
    """Two ClientApps building the same domain at once once raced on a shared temporary name."""
    import multiprocessing

    path = tmp_path / "domains" / "digits-key.npz"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_write_many, args=(str(path),)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    back = load_cached(path, "digits")
    assert back.num_labels == 3 and back.x_train.shape == (8, 1, 4, 4)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left


def test_a_random_encoder_gives_every_client_the_same_text_features(tmp_path: Path) -> None:
    # model.pretrained: false (tiny_bert): each client builds the encoder itself, so it must be
    # seeded, or every client would see its own random features.
    from fedspecialists.config import load_config
    from fedspecialists.data.domains import encode_text_domains
    from fedspecialists.data.tasks import default_cache_dir

    cfg = load_config("method=fedmoe_da suite=tiny_text model=tiny_bert")
    features = []
    for client in ("a", "b"):
        cache = tmp_path / client
        cache.mkdir()
        for shared in ("wheels", "npm"):  # the fetched data files, not the features
            if (default_cache_dir() / shared).exists():
                (cache / shared).symlink_to(default_cache_dir() / shared)
        domains = encode_text_domains(cfg.suite.tasks, 0, cache, cfg.model)
        features.append(np.concatenate([d.x_train for d in domains]))
    assert np.array_equal(features[0], features[1])


def test_client_domains_deals_out_the_pools_once_per_process() -> None:
    """Each client's share is the partition computed for all clients at once (the same indices
    as dealing the pools out anew), and the deal is kept: a large federation's workers pay for
    it once, not once per client."""
    from fedspecialists.data import domains as module

    domains = [_domain("a", 300, 5, 0.0), _domain("b", 300, 5, 1.0)]
    module._PARTITIONS.clear()
    mixture = mixture_shares(6, [5, 5], 0.5, 0.5, seed=3)
    train = domain_mixture_partition([d.y_train for d in domains], mixture, 25, 4, disjoint=True)
    test = domain_mixture_partition([d.y_test for d in domains], mixture, 10, 5, disjoint=False)
    for n in range(6):
        part = client_domains(domains, n, 6, 0.5, 0.5, 25, 10, seed=3)
        for split, idx in (("train", train[n]), ("test", test[n])):
            pools = [getattr(d, f"y_{split}") for d in domains]
            labels = np.concatenate([y[i] for y, i in zip(pools, idx, strict=True)])
            assert np.array_equal(getattr(part, f"y_{split}"), labels)
    assert len(module._PARTITIONS) == 1  # six clients, one deal
    b = domains[1]
    renamed = DomainData("b", 5, b.x_train, (b.y_train + 1) % 5, b.x_test, b.y_test)
    client_domains([domains[0], renamed], 0, 6, 0.5, 0.5, 25, 10, seed=3)
    assert len(module._PARTITIONS) == 2  # other labels: dealt anew
