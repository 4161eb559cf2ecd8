"""The allow-list of MONAI dictionary transforms a plan may name.

Each entry maps a plan name to a MONAI dictionary transform and says which keys it touches:
intensity transforms touch the image only; spatial transforms touch image and label (labels
resampled with nearest neighbour). Deterministic transforms run once when data is loaded;
random ones (names starting with ``Rand``) run per sample during training only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsilo.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from monai.transforms import Compose

    from pipelines.plan import TransformSpec


@dataclass(frozen=True)
class TransformEntry:
    cls_name: str
    spatial: bool  # applies to the label too (segmentation)

    @property
    def random(self) -> bool:
        return self.cls_name.startswith("Rand")


TRANSFORMS: dict[str, TransformEntry] = {
    "ScaleIntensity": TransformEntry("ScaleIntensityd", spatial=False),
    "ScaleIntensityRange": TransformEntry("ScaleIntensityRanged", spatial=False),
    "NormalizeIntensity": TransformEntry("NormalizeIntensityd", spatial=False),
    "Resize": TransformEntry("Resized", spatial=True),
    "SpatialPad": TransformEntry("SpatialPadd", spatial=True),
    "CenterSpatialCrop": TransformEntry("CenterSpatialCropd", spatial=True),
    "RandFlip": TransformEntry("RandFlipd", spatial=True),
    "RandRotate90": TransformEntry("RandRotate90d", spatial=True),
    "RandGaussianNoise": TransformEntry("RandGaussianNoised", spatial=False),
    "RandScaleIntensity": TransformEntry("RandScaleIntensityd", spatial=False),
}


def _build(spec: "TransformSpec", index: int, segmentation: bool) -> Any:
    import monai.transforms as mt

    entry = TRANSFORMS[spec.name]
    keys = ["image", "label"] if (entry.spatial and segmentation) else ["image"]
    kwargs = dict(spec.args)
    if spec.name == "Resize" and segmentation and "mode" not in kwargs:
        kwargs["mode"] = ("area", "nearest")
    if "keys" in kwargs:
        raise ConfigError(f"plan key 'data.transforms[{index}].args.keys': fedsilo sets the keys", fix="remove 'keys'")
    try:
        return getattr(mt, entry.cls_name)(keys=keys, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"plan key 'data.transforms[{index}]': {spec.name} rejects its arguments ({str(exc)[:160]})",
            fix="check the arguments against the MONAI documentation of this transform",
        ) from None


def split_transforms(specs: Sequence["TransformSpec"], *, segmentation: bool) -> tuple["Compose", "Compose"]:
    """(deterministic, random) Compose pipelines, in plan order within each group."""
    from monai.transforms import Compose

    deterministic, random = [], []
    for i, spec in enumerate(specs):
        (random if TRANSFORMS[spec.name].random else deterministic).append(_build(spec, i, segmentation))
    return Compose(deterministic), Compose(random)
