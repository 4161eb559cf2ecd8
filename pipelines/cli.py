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
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from pipelines.synthetic import write_synthetic_federation

    silos = write_synthetic_federation(args.out, silos=args.silos, task=args.task, seed=args.seed)
    for s in silos:
        print(f"{s.name}: {s.n_train} training + {s.n_test} test cases, datalist {s.datalist}")
    return 0
