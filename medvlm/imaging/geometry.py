"""Where the model's square input lies in the original image: open_clip's "shortest" resize and
centre crop as numbers, so a point or a map of the model's input can be put back on the image."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CropBox:
    """The resize and centre crop that turn a `width` x `height` image into the model's `size` x
    `size` input: the image is resized to `resized` (its shortest side to `size`), then the square
    at (`left`, `top`) of the resized image is kept. Coordinates are pixel edges: (0, 0) is the
    top-left corner of the first pixel, (width, height) the bottom-right corner of the last."""

    width: int
    height: int
    size: int
    resized: tuple[int, int]  # (width, height) after the resize
    left: int  # the crop's corner, in resized pixels
    top: int

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """A point of the model's input (0..size on each axis) -> the same point in the original image."""
        return ((x + self.left) * self.width / self.resized[0], (y + self.top) * self.height / self.resized[1])

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the model's input in original pixels: the part of the image
        the model sees (the whole short side, the middle of the long one)."""
        return (*self.to_original(0, 0), *self.to_original(self.size, self.size))


def crop_box(width: int, height: int, size: int) -> CropBox:
    """The geometry of open_clip's eval transform (resize_mode "shortest") for a `width` x `height`
    image and a `size` input: the long side is truncated as open_clip does (int), the crop offset
    rounded as torchvision's center_crop does."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    resized = (size, new_long) if width <= height else (new_long, size)
    top = int(round((resized[1] - size) / 2.0))
    left = int(round((resized[0] - size) / 2.0))
    return CropBox(width, height, size, resized, left, top)
