"""The benchmark's input images: the repository's samples/*.png if there are any, else deterministic PNGs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_COUNT = 8
DEFAULT_SIZE = 512


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Encoded images every system gets (as PNG bytes or as tensors made from them)."""

    pngs: list[bytes]
    source: str  # "samples/*.png" or "generated"
    size: tuple[int, int]  # width, height of the first image

    def describe(self) -> dict[str, object]:
        lengths = [len(p) for p in self.pngs]
        digest = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in self.pngs)).hexdigest()
        return {
            "source": self.source,
            "count": len(self.pngs),
            "width": self.size[0],
            "height": self.size[1],
            "png_bytes_mean": int(sum(lengths) / len(lengths)),
            "sha256_of_hashes": digest[:16],
        }


def synthetic_png(index: int, size: int = DEFAULT_SIZE) -> bytes:
    """A radiograph-like RGB image: soft blobs on a gradient with a little noise; deterministic in `index`."""
    rng = np.random.default_rng(1000 + index)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size  # [S, S] each, in [0, 1)
    base = 40 + 80 * y + 20 * np.sin(6 * x + index)  # [S, S]
    for _ in range(3):
        cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
        rx, ry = rng.uniform(0.08, 0.3), rng.uniform(0.1, 0.35)
        base = base + rng.uniform(60, 120) * np.exp(-(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2))
    tint = np.array([1.0, 0.95 + 0.05 * (index % 2), 0.9], dtype=np.float32)  # [3]
    noise = rng.normal(0, 6, size=(size, size, 1)).astype(np.float32)  # [S, S, 1]
    rgb = np.clip(base[..., None] * tint + noise, 0, 255).astype(np.uint8)  # [S, S, 3]
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def load_images(root: Path, count: int = DEFAULT_COUNT, size: int = DEFAULT_SIZE) -> ImageSet:
    """samples/*.png under `root` when present (sorted by name), else `count` generated PNGs of `size`."""
    samples = sorted((root / "samples").glob("*.png"))
    if samples:
        pngs = [p.read_bytes() for p in samples]
        source = "samples/*.png"
    else:
        pngs = [synthetic_png(i, size) for i in range(count)]
        source = f"generated ({count} x {size}x{size} RGB PNG, bench.images.synthetic_png)"
    with Image.open(io.BytesIO(pngs[0])) as first:
        dims = first.size
    return ImageSet(pngs=pngs, source=source, size=dims)
