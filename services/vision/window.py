"""Greyscale of more than 8 bits -> 8 bits by a display window: the one mapping of the PNG and DICOM paths."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from services.common.errors import InvalidInput

LINEAR, LINEAR_EXACT, SIGMOID = "LINEAR", "LINEAR_EXACT", "SIGMOID"


@dataclasses.dataclass(frozen=True)
class Window:
    """A VOI window (DICOM PS3.3 C.11.2.1.2) in the image's own units (HU for CT)."""

    center: float
    width: float
    function: str = LINEAR

    def valid(self) -> bool:
        """Finite, and wide enough for its function (LINEAR needs width >= 1, the others > 0)."""
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            return False
        return self.width >= 1 if self.function == LINEAR else self.width > 0


# Common CT windows in Hounsfield units (radiology teaching values; sites tune their own).
PRESETS: dict[str, Window] = {
    "lung": Window(-600, 1500),
    "mediastinum": Window(50, 350),
    "bone": Window(400, 1800),
    "brain": Window(40, 80),
    "abdomen": Window(50, 400),
}


@dataclasses.dataclass(frozen=True)
class WindowRequest:
    """What a caller asked for: an explicit window, a preset name, or neither (None)."""

    window: Window | None = None
    preset: str | None = None

    def resolve(self) -> Window | None:
        """The window to apply, or None for the image's own default."""
        if self.window is not None:
            return self.window
        return PRESETS[self.preset] if self.preset else None


NO_WINDOW = WindowRequest()


def checked_window(center: float, width: float, label: str) -> Window:
    """A caller's window, refused (InvalidInput) unless finite with width >= 1."""
    window = Window(float(center), float(width))
    if not window.valid():
        raise InvalidInput(f"{label}: window width must be at least 1 and both values finite")
    return window


def data_range(values: np.ndarray) -> tuple[float, float]:
    """Minimum and maximum of the values: the default window of a >8-bit greyscale image.

    Min/max, not a percentile range: a 12-bit export of an 8-bit rendering then maps back
    to that rendering exactly (measured cosine 1.0 through the demo model, where a 0.5-99.5
    percentile stretch lost contrast detail in bright regions); the price is that a few
    outlier pixels (metal, burned-in text at full scale) compress the rest. A caller who
    knows the data passes a window.
    """
    return float(values.min()), float(values.max())


def to_eight_bit(values: np.ndarray, window: Window | None) -> np.ndarray:
    """Greyscale values [H, W] (any numeric dtype) -> uint8 [H, W] through `window`, or
    through the data's own min..max when window is None. A constant image maps to black;
    nothing here divides by zero or yields NaN."""
    v = np.asarray(values, dtype=np.float64)  # [H, W]
    if window is None:
        lo, hi = data_range(v)
        if not hi > lo:
            return np.zeros(v.shape, dtype=np.uint8)
        out = (v - lo) / (hi - lo)
    elif window.function == SIGMOID:
        out = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (v - window.center) / window.width, -700, 700)))
    else:
        center, width = window.center, window.width
        if window.function == LINEAR:  # PS3.3 C.11.2.1.2.1: the half-pixel convention
            center, width = center - 0.5, width - 1.0
        if width <= 0:  # LINEAR with width 1: a threshold at the centre
            out = (v > center).astype(np.float64)
        else:
            out = np.clip((v - center) / width + 0.5, 0.0, 1.0)
    return np.rint(out * 255.0).astype(np.uint8)
