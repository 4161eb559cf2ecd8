"""``fedsilo silo``: hospital IT's commands (site folder, datasets)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub) -> None:
    silo = sub.add_parser("silo", help="hospital side: site folder and datasets")
    ssub = silo.add_subparsers(dest="silo_command", metavar="COMMAND", required=True, parser_class=type(silo))
    p = ssub.add_parser("init", help="create a site folder")
    p.add_argument("site_dir", type=Path)
    p.add_argument("--site", required=True, help="the site's id, e.g. hospital0")
    p.set_defaults(func=_init)

    ds = ssub.add_parser("dataset", help="register and list datasets")
    dsub = ds.add_subparsers(dest="dataset_command", metavar="COMMAND", required=True, parser_class=type(silo))
    p = dsub.add_parser("add", help="register a dataset from a MONAI datalist JSON")
    p.add_argument("name")
    p.add_argument("--site", dest="site_dir", type=Path, required=True, help="the site folder")
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--task", required=True, help="seg3d, seg2d, cls3d or cls2d")
    p.set_defaults(func=_dataset_add)
    p = dsub.add_parser("list", help="list registered datasets")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.set_defaults(func=_dataset_list)


def _init(args: argparse.Namespace) -> int:
    from silo_agent.site import init_site

    site = init_site(args.site_dir, args.site)
    print(f"site {site.site_id} ready at {site.root}")
    return 0


def _dataset_add(args: argparse.Namespace) -> int:
    from silo_agent.site import Site, register_dataset

    site = register_dataset(Site.open(args.site_dir), args.name, task=args.task, datalist=args.datalist)
    print(f"dataset {args.name} ({args.task}) registered at site {site.site_id}")
    return 0


def _dataset_list(args: argparse.Namespace) -> int:
    from silo_agent.site import Site

    site = Site.open(args.site_dir)
    for entry in site.datasets.values():
        print(f"{entry.name}\t{entry.task}\t{entry.datalist}")
    return 0
