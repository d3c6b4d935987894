"""A bundle's image preprocessing: the manifest's `image` section (engines.runtime.manifest reads it)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """open_clip preprocessing: resize shortest side, center crop, normalize."""

    size: int  # square crop side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    resize_mode: str = "shortest"  # open_clip's default resize mode
