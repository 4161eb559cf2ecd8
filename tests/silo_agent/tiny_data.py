"""A tiny, valid NIfTI dataset (image and mask pairs plus a MONAI datalist) for tests that need a registrable dataset fast."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def write_tiny_datalist(folder: Path, *, cases: int = 3, size: int = 8, names: list[str] | None = None) -> Path:
    """``cases`` seg3d cases of size^3 under ``folder`` (images/NAME.nii.gz, labels/NAME.nii.gz); returns the datalist."""
    names = names or [f"case-{i}" for i in range(cases)]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(0)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    entries = []
    for name in names:
        image = rs.rand(size, size, size).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), folder / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image((image > 0.5).astype(np.uint8), affine), folder / "labels" / f"{name}.nii.gz")
        entries.append({"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"})
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"training": entries[:-1], "test": entries[-1:]}), encoding="utf-8")
    return datalist
