"""``fedsilo synth``: synthetic hospitals as real DICOM series and NIfTI labels."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic hospitals (DICOM + NIfTI, non-IID) for demos and tests")
    p.add_argument("out", type=Path, help="folder to write one sub-folder per hospital into")
    p.add_argument("--silos", type=int, default=3)
    p.add_argument("--task", default="seg3d", help="seg3d, seg2d, cls3d or cls2d (default: seg3d)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="image edge in voxels (default: 32 for 3D tasks, 64 for 2D)")
    p.add_argument("--sizes", default=None, help="cases per silo, comma-separated (default: 120..240 spread over the silos)")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from fedsilo.errors import ConfigError
    from pipelines.synthetic import write_synthetic_federation

    sizes = None
    if args.sizes is not None:
        try:
            sizes = [int(v) for v in args.sizes.split(",")]
        except ValueError:
            raise ConfigError(f"--sizes {args.sizes!r} is not a list of whole numbers", fix="e.g. --sizes 8,8") from None
    silos = write_synthetic_federation(args.out, silos=args.silos, task=args.task, seed=args.seed, size=args.size, sizes=sizes)
    for s in silos:
        print(f"{s.name}: {s.n_train} training + {s.n_test} test cases, datalist {s.datalist}")
    return 0
