"""Write a partitioned offline benchmark as sites' own files (the bring-your-own-data layout).

Usage::

    python scripts/export_site_data.py --out sites --sites 3                      # images
    python scripts/export_site_data.py --out sites-text --sites 3 \
        --overrides "suite=offline_text" --site-suite site_text

Each ``<out>/site<i>`` is then a SuperNode's ``data-dir`` for a run with ``suite=site_images``
(or ``suite=site_text``); ``scripts/local_federation.py --data-root <out>`` starts such sites.
"""

from __future__ import annotations

import argparse

from fedspecialists.data.site_files import export_sites


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument(
        "--overrides",
        default="method=fedmoe_da",
        help="the source experiment (its suite, partition and seed)",
    )
    parser.add_argument("--site-suite", default="site_images", help="conf/suite layout to follow")
    args = parser.parse_args()
    for site in export_sites(args.overrides, args.site_suite, args.out, args.sites):
        files = sorted(p.relative_to(site) for p in site.rglob("*.csv"))
        print(site, "holds", ", ".join(str(f) for f in files))


if __name__ == "__main__":
    main()
