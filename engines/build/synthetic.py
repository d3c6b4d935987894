"""Procedural medical-style images with captions, the training data of the demo model (not clinical)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import logging
import math
import multiprocessing
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 224
# Bump when rendering changes, so caches keyed on it are rebuilt.
GENERATOR_VERSION = 4

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Modality:
    """An imaging modality: its key and the names captions use for it."""

    key: str
    names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Finding:
    """One class: a finding of one modality.

    `label` is self-contained and unique across classes (it is the plain zero-shot prompt);
    `phrases` are the ways captions describe the finding inside a template.
    """

    key: str
    modality: str
    label: str
    phrases: tuple[str, ...]


MODALITIES = (
    Modality("chest", ("chest radiograph", "chest x-ray", "frontal chest film", "pa chest radiograph",
                       "chest x-ray image")),
    Modality("derm", ("dermoscopy image", "dermoscopic photograph", "dermatoscopy view",
                      "skin lesion close-up")),
    Modality("fundus", ("fundus photograph", "retinal photograph", "colour fundus image", "fundus photo")),
)
_MODALITY = {m.key: m for m in MODALITIES}

# Chest sides follow radiographic convention: the patient's left is on the image's right.
FINDINGS = (
    Finding("chest_normal", "chest", "normal chest radiograph", (
        "no acute abnormality", "clear lungs and normal heart size", "normal findings",
        "unremarkable lungs and heart", "no active disease")),
    Finding("chest_left_effusion", "chest", "left pleural effusion", (
        "left pleural effusion", "a left-sided pleural effusion", "fluid in the left pleural space",
        "blunting of the left costophrenic angle", "a pleural effusion on the left")),
    Finding("chest_right_effusion", "chest", "right pleural effusion", (
        "right pleural effusion", "a right-sided pleural effusion", "fluid in the right pleural space",
        "blunting of the right costophrenic angle", "a pleural effusion on the right")),
    Finding("chest_cardiomegaly", "chest", "cardiomegaly", (
        "cardiomegaly", "an enlarged cardiac silhouette", "an enlarged heart",
        "an increased cardiothoracic ratio", "marked cardiomegaly")),
    Finding("chest_pneumothorax", "chest", "pneumothorax", (
        "pneumothorax", "a collapsed lung with pleural air", "air in the pleural space",
        "a pleural line with absent lung markings beyond it", "a large pneumothorax")),
    Finding("chest_consolidation", "chest", "lobar consolidation", (
        "lobar consolidation", "lobar pneumonia", "a dense airspace opacity",
        "consolidation of one lobe", "a lobar opacity with air bronchograms")),
    Finding("derm_naevus", "derm", "benign melanocytic naevus", (
        "a benign naevus", "a regular pigmented mole", "a symmetric brown naevus",
        "a uniform round mole", "benign melanocytic naevus")),
    Finding("derm_irregular", "derm", "melanoma-like irregular lesion", (
        "an irregular multicoloured lesion", "an asymmetric lesion with irregular borders",
        "a lesion suspicious for melanoma", "an atypical pigmented lesion with several colours",
        "melanoma-like irregular lesion")),
    Finding("derm_erythema", "derm", "diffuse erythema", (
        "diffuse redness of the skin", "a diffuse erythematous rash", "widespread erythema",
        "inflamed red skin without a discrete lesion", "diffuse erythema")),
    Finding("derm_vascular", "derm", "vascular lesion", (
        "a cherry angioma", "a haemangioma with red lacunae", "a vascular lesion",
        "red to purple lagoons of a vascular lesion", "a benign vascular lesion")),
    Finding("fundus_normal", "fundus", "normal fundus", (
        "a healthy retina", "no retinal abnormality", "a normal optic disc and macula",
        "an unremarkable fundus", "no signs of retinopathy")),
    Finding("fundus_diabetic", "fundus", "diabetic retinopathy", (
        "diabetic retinopathy", "dot and blot haemorrhages with hard exudates",
        "microaneurysms and exudates", "non-proliferative diabetic retinopathy",
        "retinal haemorrhages and exudates of diabetes")),
    Finding("fundus_glaucoma", "fundus", "glaucomatous optic disc cupping", (
        "an enlarged optic cup", "glaucomatous cupping", "a high cup to disc ratio",
        "glaucoma with a pale enlarged cup", "glaucomatous optic disc cupping")),
    Finding("fundus_detachment", "fundus", "retinal detachment", (
        "a detached retina", "retinal detachment", "an elevated grey retina with folds",
        "a rhegmatogenous retinal detachment", "a large retinal detachment")),
)
CLASS_KEYS = tuple(f.key for f in FINDINGS)
CLASS_LABELS = tuple(f.label for f in FINDINGS)
NUM_CLASSES = len(FINDINGS)

# Caption templates. None of them is "an image showing {}", the held-out template of the evaluation.
TEMPLATES = (
    "{finding}",
    "{modality} showing {finding}",
    "{modality} with {finding}",
    "{finding} seen on the {modality}",
    "{modality}: {finding}",
    "{modality} demonstrating {finding}",
    "{modality} of a patient with {finding}",
    "findings: {finding}",
    "a {modality} revealing {finding}",
)
LABEL_CAPTION_P = 0.2  # probability that a caption is the plain label alone


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated image with its class and a caption."""

    image: np.ndarray  # uint8 [H, W, 3]
    label: int  # index into FINDINGS
    caption: str


def class_captions(label: int) -> list[str]:
    """Every caption the generator can write for a class, in a fixed order."""
    finding = FINDINGS[label]
    names = _MODALITY[finding.modality].names
    out = [finding.label]
    for template, name, phrase in itertools.product(TEMPLATES, names, finding.phrases):
        out.append(template.format(modality=name, finding=phrase))
    return list(dict.fromkeys(out))


def all_captions() -> list[str]:
    """Every caption of every class, in a fixed order (the corpus of the vocabulary)."""
    return [c for label in range(NUM_CLASSES) for c in class_captions(label)]


def caption(label: int, rng: np.random.Generator) -> str:
    """Draw one caption for a class: the plain label, or a template with a modality name and a phrase."""
    finding = FINDINGS[label]
    if rng.random() < LABEL_CAPTION_P:
        return finding.label
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    names = _MODALITY[finding.modality].names
    return template.format(modality=names[rng.integers(len(names))],
                           finding=finding.phrases[rng.integers(len(finding.phrases))])


def sample(seed: int, index: int) -> Sample:
    """Sample `index` of data set `seed`: class `index % NUM_CLASSES`, everything else drawn from the seed."""
    rng = np.random.default_rng([seed, index])
    label = index % NUM_CLASSES
    finding = FINDINGS[label]
    image = _RENDERERS[finding.modality](finding.key, rng)
    return Sample(image=image, label=label, caption=caption(label, rng))


def _render_range(args: tuple[int, int, int]) -> np.ndarray:
    seed, start, stop = args
    return np.stack([sample(seed, i).image for i in range(start, stop)])


def _render_into(args: tuple[int, int, int, str]) -> None:
    seed, start, stop, path = args
    images = np.load(path, mmap_mode="r+")
    for i in range(start, stop):
        images[i] = sample(seed, i).image
    images.flush()


def _map(fn, jobs: list[tuple], workers: int) -> list:
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            return pool.map(fn, jobs)
    return [fn(job) for job in jobs]


def _chunks(count: int, size: int = 256) -> list[tuple[int, int]]:
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def generate(seed: int, count: int, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [count, H, W, 3] and labels int64 [count], in memory; the same for any worker count."""
    labels = np.arange(count, dtype=np.int64) % NUM_CLASSES
    parts = _map(_render_range, [(seed, a, b) for a, b in _chunks(count)], workers)
    images = np.concatenate(parts) if parts else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return images, labels


def write_npy(seed: int, count: int, path: Path, workers: int = 1) -> Path:
    """Render data set `seed` straight into a .npy file (uint8 [count, H, W, 3]) that the workers share.

    Same images as `generate`, without passing them between processes. Labels are
    `arange(count) % NUM_CLASSES`.
    """
    shape = (count, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
    _map(_render_into, [(seed, a, b, str(path)) for a, b in _chunks(count)], workers)
    return path


# ----------------------------------------------------------------------------- drawing helpers


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, soft: float = 1.5) -> np.ndarray:
    """Soft elliptical mask in [0, 1], 1 inside; `soft` is the edge width in pixels."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = _XX - cx, _YY - cy
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    r = np.sqrt(u * u + v * v)
    return np.clip((1.0 - r) * min(rx, ry) / soft + 0.5, 0.0, 1.0)


def _spot(img: np.ndarray, colour, cx: float, cy: float, rx: float, ry: float, soft: float = 1.0,
          alpha: float = 1.0) -> None:
    """Blend a small soft ellipse into `img` in place, touching only its bounding box."""
    x0, x1 = max(int(cx - rx - soft - 1), 0), min(int(cx + rx + soft + 2), IMAGE_SIZE)
    y0, y1 = max(int(cy - ry - soft - 1), 0), min(int(cy + ry + soft + 2), IMAGE_SIZE)
    if x0 >= x1 or y0 >= y1:
        return
    u = (_XX[y0:y1, x0:x1] - cx) / rx
    v = (_YY[y0:y1, x0:x1] - cy) / ry
    mask = np.clip((1.0 - np.sqrt(u * u + v * v)) * min(rx, ry) / soft + 0.5, 0.0, 1.0) * alpha
    img[y0:y1, x0:x1] = _blend(img[y0:y1, x0:x1], colour, mask)


def _dots(img: np.ndarray, colour, spots: list[tuple[float, float, float, float]], blur: float = 0.7,
          alpha: float = 1.0) -> np.ndarray:
    """Blend small ellipses (x, y, rx, ry) of one colour in one pass: drawn by PIL, softened by a blur."""
    canvas, draw = _canvas()
    for x, y, rx, ry in spots:
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=255)
    return _blend(img, colour, _as_mask(canvas, blur) * alpha)


def _step(x: np.ndarray, soft: float) -> np.ndarray:
    """Soft step: 0 below zero, 1 above, linear over `soft` pixels."""
    return np.clip(x / soft + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth noise [H, W], roughly unit variance, with `cells` features across the image."""
    small = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = Image.fromarray(small).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC,
                                        box=(1.5, 1.5, cells + 1.5, cells + 1.5))
    return np.asarray(big, dtype=np.float32)


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    return img, ImageDraw.Draw(img)


def _as_mask(img: Image.Image, blur: float) -> np.ndarray:
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(img, dtype=np.float32) / 255.0


def _blend(img: np.ndarray, color, mask: np.ndarray) -> np.ndarray:
    """img * (1 - mask) + color * mask, for gray [H, W] or colour [H, W, 3] images."""
    if img.ndim == 3:
        mask = mask[..., None]
        color = np.asarray(color, dtype=np.float32)
    return img + (color - img) * mask


@dataclasses.dataclass(frozen=True)
class _Pose:
    """Range of a random rotation (degrees), scale and shift (pixels) of a whole image."""

    max_deg: float
    scale: tuple[float, float]
    max_shift: float


def _affine(img: Image.Image, rng: np.random.Generator, pose: _Pose, fill) -> Image.Image:
    """Rotate, scale and shift about the image centre with bilinear resampling."""
    angle = math.radians(rng.uniform(-pose.max_deg, pose.max_deg))
    k = rng.uniform(*pose.scale)
    tx, ty = rng.uniform(-pose.max_shift, pose.max_shift, size=2)
    c = IMAGE_SIZE / 2
    cos, sin = math.cos(angle) / k, math.sin(angle) / k
    # PIL maps output (x, y) to input (a x + b y + c, d x + e y + f).
    data = (cos, sin, c - cos * (c + tx) - sin * (c + ty), -sin, cos, c + sin * (c + tx) - cos * (c + ty))
    return img.transform((IMAGE_SIZE, IMAGE_SIZE), Image.AFFINE, data, Image.BILINEAR, fillcolor=fill)


@functools.cache
def _noise_bank() -> np.ndarray:
    """Unit Gaussian noise [2H, 2W, 3] from a fixed seed; images take random windows of it (cheap)."""
    rng = np.random.default_rng(20261125)
    return rng.standard_normal((2 * IMAGE_SIZE, 2 * IMAGE_SIZE, 3), dtype=np.float32)


def _finish(img: np.ndarray, rng: np.random.Generator, noise: tuple[float, float], gamma: tuple[float, float],
            pose: _Pose | None = None, blur: float = 0.0) -> np.ndarray:
    """Pose, optional blur, gamma and sensor noise of a float image in [0, 1]; returns uint8 RGB [H, W, 3]."""
    u8 = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    pil = Image.fromarray(u8)
    if pose is not None:
        corner = u8[0, 0]
        pil = _affine(pil, rng, pose, int(corner) if u8.ndim == 2 else tuple(int(v) for v in corner))
    if blur > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(blur))
    lut = np.linspace(0.0, 1.0, 256, dtype=np.float32) ** np.float32(rng.uniform(*gamma))
    out = lut[np.asarray(pil)]
    oy, ox = rng.integers(0, IMAGE_SIZE, size=2)
    window = _noise_bank()[oy:oy + IMAGE_SIZE, ox:ox + IMAGE_SIZE]
    out += (window if out.ndim == 3 else window[..., 0]) * np.float32(rng.uniform(*noise))
    out = (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=-1) if out.ndim == 2 else out


def _branches(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, y: float, angle: float,
              length: float, width: float, depth: int, value: int, spread: float = 0.5) -> None:
    """Draw a branching tree of slightly wavy line segments (vessels, bronchi)."""
    steps = 4
    for _ in range(steps):
        angle += rng.normal(0.0, 0.15)
        nx = x + math.cos(angle) * length / steps
        ny = y + math.sin(angle) * length / steps
        draw.line([(x, y), (nx, ny)], fill=value, width=max(1, round(width)))
        x, y = nx, ny
    if depth > 0:
        for side in (-1, 1):
            turn = side * rng.uniform(0.2, spread)
            _branches(draw, rng, x, y, angle + turn, length * rng.uniform(0.55, 0.8), width * 0.7, depth - 1,
                      value, spread)


# ----------------------------------------------------------------------------- chest radiograph


_CHEST_POSE = _Pose(max_deg=7, scale=(0.88, 1.06), max_shift=10)


def _render_chest(key: str, rng: np.random.Generator) -> np.ndarray:
    bg = rng.uniform(0.02, 0.12)
    soft = rng.uniform(0.36, 0.48)  # soft-tissue density
    cx = IMAGE_SIZE / 2 + rng.normal(0, 3)
    half_w = rng.uniform(78, 90)  # half width of the thorax
    lung_cy = rng.uniform(98, 110)
    lung_rx = half_w * rng.uniform(0.40, 0.45)
    lung_ry = rng.uniform(66, 76)
    lung_dark = soft - rng.uniform(0.18, 0.24)
    dense = soft + rng.uniform(0.16, 0.24)  # heart, mediastinum, fluid
    side = 1 if rng.random() < 0.5 else -1  # +1 is the image's right (the patient's left)

    img = np.full((IMAGE_SIZE, IMAGE_SIZE), bg, np.float32)
    body = _ellipse(cx, lung_cy + 30, half_w + 20, 150, soft=6.0)
    img = _blend(img, soft, body)

    lungs = {}
    for s in (-1, 1):
        lx = cx + s * half_w * 0.5
        dome_top = lung_cy + lung_ry * rng.uniform(0.55, 0.7) - (6 if s < 0 else 0)  # right dome sits higher
        dome = dome_top + 16 * ((_XX - lx) / lung_rx) ** 2
        field = _ellipse(lx, lung_cy, lung_rx, lung_ry, angle=s * rng.uniform(0.0, 0.08), soft=2.5)
        lungs[s] = (lx, field * _step(dome - _YY, 2.0), field)
    lung_mask = np.maximum(lungs[-1][1], lungs[1][1])

    markings = np.zeros_like(img)
    ribs_img, ribs = _canvas()
    for s in (-1, 1):
        vessel_img, vessels = _canvas()
        hx, hy = cx + s * half_w * 0.22, lung_cy + rng.normal(0, 4)
        for k in range(6):
            angle = -math.pi / 2 + 0.15 + k * 0.45 + rng.normal(0, 0.1)  # from up, turning lateral
            angle = angle if s > 0 else math.pi - angle
            _branches(vessels, rng, hx, hy, angle, rng.uniform(28, 40), 3.0, 2, 255)
        markings += _as_mask(vessel_img, 0.8) * lungs[s][1]
        for k in range(9):
            y0 = lung_cy - lung_ry + 6 + k * rng.uniform(14, 16)
            pts = [(cx + s * (6 + t * (half_w + 6)), y0 + 26 * t - 10 * t * t + rng.normal(0, 0.5))
                   for t in np.linspace(0, 1, 9)]
            ribs.line(pts, fill=255, width=4)
    img = _blend(img, lung_dark, lung_mask)

    # Markings are drawn below; pneumothorax removes them beyond the pleural line.
    pleural_line = np.zeros_like(img)
    if key == "chest_pneumothorax":
        lx, field, _ = lungs[side]
        shrink = rng.uniform(0.35, 0.55)  # the collapsed lung keeps this fraction of its width, at the hilum
        collapsed = _ellipse(lx - side * lung_rx * (1 - shrink) * 0.9, lung_cy + lung_ry * (1 - shrink) * 0.5,
                             lung_rx * shrink, lung_ry * rng.uniform(0.6, 0.75), soft=1.5)
        air = field * (1.0 - collapsed)
        img = _blend(img, lung_dark * rng.uniform(0.0, 0.3), air)  # black, without markings
        img = _blend(img, lung_dark + rng.uniform(0.1, 0.14), field * collapsed)  # denser collapsed lung
        markings = markings * (1.0 - air)
        pleural_line = field * np.clip(4.0 * collapsed * (1.0 - collapsed), 0, 1)

    img = img + markings * rng.uniform(0.1, 0.16) + pleural_line * rng.uniform(0.25, 0.35)
    img = img + _as_mask(ribs_img, 1.0) * body * rng.uniform(0.05, 0.09)

    # Mediastinum, spine and heart.
    img = _blend(img, dense, _ellipse(cx, lung_cy - 25, half_w * 0.16, 70, soft=3.0))
    ctr = rng.uniform(0.60, 0.72) if key == "chest_cardiomegaly" else rng.uniform(0.36, 0.46)
    heart_rx = ctr * half_w
    heart_ry = heart_rx * rng.uniform(0.6, 0.72)
    heart_cy = lung_cy + lung_ry * 0.62 - heart_ry * 0.55
    img = _blend(img, dense, _ellipse(cx + heart_rx * 0.22, heart_cy, heart_rx, heart_ry,
                                      angle=rng.uniform(-0.2, 0.0), soft=2.0))
    abdomen = np.clip(body - lung_mask, 0, 1) * _step(_YY - (lung_cy + lung_ry * 0.6), 6.0)
    img = _blend(img, soft + 0.05, abdomen)

    if key in ("chest_left_effusion", "chest_right_effusion"):
        s = 1 if key == "chest_left_effusion" else -1
        lx, _, field = lungs[s]
        frac = rng.uniform(0.35, 0.6)
        top = lung_cy + lung_ry - 2 * lung_ry * frac
        lateral = np.clip((_XX - lx) * s / lung_rx + 1.0, 0, 2) / 2  # 0 medial .. 1 lateral
        surface = top - rng.uniform(10, 24) * lateral ** 1.5  # meniscus: higher laterally
        below = _ellipse(lx, lung_cy + 8, lung_rx + 4, lung_ry + 10, soft=2.0)
        fluid = below * _step(_YY - surface, 4.0)
        img = _blend(img, dense - rng.uniform(0.0, 0.04), fluid)
    elif key == "chest_consolidation":
        lx, field, _ = lungs[side]
        if rng.random() < 0.5:  # upper lobe, bounded below by a sharp fissure
            zone = -0.45
            fissure = lung_cy + rng.uniform(-0.2, 0.1) * lung_ry + rng.uniform(-0.15, 0.15) * (_XX - lx)
            blob = _step(fissure - _YY, 1.5)
        else:  # a rounded lobar opacity in the mid zone
            zone = rng.uniform(-0.2, 0.1)
            blob = _ellipse(lx + rng.normal(0, 4), lung_cy + zone * lung_ry, lung_rx * rng.uniform(0.75, 1.0),
                            lung_ry * rng.uniform(0.35, 0.5), angle=rng.uniform(-0.3, 0.3), soft=5.0)
        blob = np.clip(blob * (1.0 + 0.2 * _smooth_noise(rng, 10)), 0, 1) * field
        bronchi_img, bronchi = _canvas()
        _branches(bronchi, rng, cx + side * half_w * 0.25, lung_cy + zone * lung_ry,
                  -math.pi / 2 + side * rng.uniform(1.2, 1.9), 30, 2.0, 2, 255)
        img = _blend(img, dense - 0.04, blob * rng.uniform(0.85, 1.0))
        img = img - _as_mask(bronchi_img, 0.7) * blob * 0.12

    # Exposure gradient, collimation and side markers.
    img = img + _smooth_noise(rng, 3) * rng.uniform(0.01, 0.04)
    if rng.random() < 0.5:
        mx, my = rng.choice([18, 190]), rng.uniform(14, 40)
        _spot(img, 0.95, mx, my, 7, 9)
    if rng.random() < 0.3:
        edge = rng.uniform(4, 18)
        img = _blend(img, bg * 0.5, 1.0 - _step(_XX - edge, 1.0) * _step(IMAGE_SIZE - edge - _XX, 1.0))
    lo, hi = rng.uniform(0.0, 0.06), rng.uniform(0.9, 1.05)
    return _finish((img - lo) / (hi - lo), rng, noise=(0.01, 0.04), gamma=(0.75, 1.35), pose=_CHEST_POSE)


# ----------------------------------------------------------------------------- dermoscopy

_SKIN_LIGHT = np.array([0.93, 0.78, 0.68], np.float32)
_SKIN_DARK = np.array([0.58, 0.39, 0.28], np.float32)
_RED = np.array([0.78, 0.10, 0.16], np.float32)  # lacunae of a vascular lesion range from red ...
_PURPLE = np.array([0.42, 0.08, 0.30], np.float32)  # ... to purple
_LESION_COLOURS = {
    "black": (0.10, 0.07, 0.07), "dark_brown": (0.30, 0.18, 0.12), "light_brown": (0.62, 0.42, 0.28),
    "blue_grey": (0.38, 0.42, 0.52), "red": (0.72, 0.26, 0.26), "white": (0.88, 0.84, 0.80),
}


def _render_derm(key: str, rng: np.random.Generator) -> np.ndarray:
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * rng.uniform(0, 1) + rng.normal(0, 0.02, 3)
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    img[:] = skin
    img = img * (1.0 + 0.04 * _smooth_noise(rng, 14))[..., None]
    lcx, lcy = IMAGE_SIZE / 2 + rng.normal(0, 14, size=2)

    if key == "derm_naevus":
        r = rng.uniform(22, 48)
        mask = _ellipse(lcx, lcy, r, r * rng.uniform(0.82, 1.0), angle=rng.uniform(0, math.pi),
                        soft=rng.uniform(2, 4))
        brown = np.array([0.45, 0.28, 0.18], np.float32) * rng.uniform(0.6, 1.15)
        centre = _ellipse(lcx, lcy, r * 0.6, r * 0.6, soft=r * 0.4)
        img = _blend(img, brown, mask * 0.95)
        texture = (1.0 - 0.12 * centre * mask) * (1.0 + 0.03 * _smooth_noise(rng, 40) * mask)
        img = img * texture[..., None]
    elif key == "derm_irregular":
        r = rng.uniform(40, 70)
        theta = np.arctan2(_YY - lcy, _XX - lcx)
        radius = np.full_like(theta, r)
        for k in range(2, 8):
            radius += r * rng.uniform(0.04, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
        dist = np.sqrt((_XX - lcx) ** 2 + (_YY - lcy) ** 2)
        mask = _step(radius - dist, 2.0)
        names = rng.choice(list(_LESION_COLOURS), size=rng.integers(3, 6), replace=False)
        if "dark_brown" not in names:
            names[0] = "dark_brown"
        fields = np.stack([_smooth_noise(rng, 6) for _ in names])
        zone = np.argmax(fields, axis=0)
        colour = np.asarray([_LESION_COLOURS[n] for n in names], np.float32)[zone]
        img = img + (colour - img) * mask[..., None] * 0.95
        dots = []
        for _ in range(rng.integers(8, 25)):  # dots and globules, denser at the periphery
            a, d = rng.uniform(0, 2 * math.pi), r * rng.uniform(0.6, 1.1)
            dots.append((lcx + d * math.cos(a), lcy + d * math.sin(a), *rng.uniform(1.5, 4, size=2)))
        img = _dots(img, _LESION_COLOURS["black"], dots)
    elif key == "derm_erythema":
        patch = _step(_smooth_noise(rng, 4) + rng.uniform(0.0, 0.8), 0.8)
        redness = rng.uniform(0.6, 0.9) * patch * (1.0 + 0.25 * _smooth_noise(rng, 20))
        red = np.array([0.86, 0.36, 0.36], np.float32)
        img = _blend(img, red, np.clip(redness, 0, 1))
        papules, flecks = [], []
        for _ in range(rng.integers(10, 40)):
            x, y = rng.uniform(0, IMAGE_SIZE, size=2)
            (papules if rng.random() < 0.7 else flecks).append((x, y, *rng.uniform(1.5, 3.5, size=2)))
        img = _dots(img, (0.75, 0.22, 0.24), papules, alpha=0.8)
        img = _dots(img, (0.95, 0.92, 0.9), flecks, alpha=0.8)
    elif key == "derm_vascular":
        r = rng.uniform(22, 42)
        mask = _ellipse(lcx, lcy, r, r * rng.uniform(0.75, 1.0), angle=rng.uniform(0, math.pi), soft=2.5)
        img = _blend(img, (0.86, 0.55, 0.55), mask)
        for _ in range(rng.integers(8, 24)):
            a, d = rng.uniform(0, 2 * math.pi), r * math.sqrt(rng.uniform(0, 0.75))
            t = rng.uniform(0, 1)
            colour = _RED * (1 - t) + _PURPLE * t
            _spot(img, colour, lcx + d * math.cos(a), lcy + d * math.sin(a), *rng.uniform(3, 8, size=2),
                  soft=1.2)

    hair_img, hairs = _canvas()
    for _ in range(rng.integers(0, 8)):
        x, y, a = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE), rng.uniform(0, 2 * math.pi)
        pts = []
        for _ in range(12):
            pts.append((x, y))
            a += rng.normal(0, 0.08)
            x, y = x + 12 * math.cos(a), y + 12 * math.sin(a)
        hairs.line(pts, fill=255, width=int(rng.integers(1, 3)))
    img = _blend(img, (0.12, 0.08, 0.06), _as_mask(hair_img, 0.5) * 0.85)
    if rng.random() < 0.25:  # an air bubble in the immersion fluid
        bx, by, br = rng.uniform(30, 190), rng.uniform(30, 190), rng.uniform(6, 16)
        ring = _ellipse(bx, by, br, br, soft=1.0) - _ellipse(bx, by, br - 2, br - 2, soft=1.0)
        img = _blend(img, (0.97, 0.97, 0.97), np.clip(ring, 0, 1) * 0.7)
    img = img * rng.uniform(0.85, 1.12) * rng.uniform(0.93, 1.07, size=3).astype(np.float32)
    if rng.random() < 0.5:  # the round field of a contact dermatoscope
        field = _ellipse(IMAGE_SIZE / 2 + rng.normal(0, 4), IMAGE_SIZE / 2 + rng.normal(0, 4),
                         *(rng.uniform(100, 125),) * 2, soft=3.0)
        img = img * field[..., None]
    return _finish(img, rng, noise=(0.005, 0.03), gamma=(0.85, 1.2))


# ----------------------------------------------------------------------------- fundus photograph


_FUNDUS_POSE = _Pose(max_deg=10, scale=(0.94, 1.04), max_shift=6)


def _render_fundus(key: str, rng: np.random.Generator) -> np.ndarray:
    fcx, fcy = IMAGE_SIZE / 2 + rng.normal(0, 4, size=2)
    radius = rng.uniform(96, 108)
    field = _ellipse(fcx, fcy, radius, radius, soft=2.0)
    base = np.array([rng.uniform(0.72, 0.9), rng.uniform(0.28, 0.42), rng.uniform(0.1, 0.2)], np.float32)
    dist = np.sqrt((_XX - fcx) ** 2 + (_YY - fcy) ** 2) / radius
    shade = (1.0 - 0.35 * dist ** 2) * (1.0 + 0.05 * _smooth_noise(rng, 10))
    img = base * shade[..., None]

    eye = 1 if rng.random() < 0.5 else -1  # side of the optic disc
    dx, dy = fcx + eye * radius * rng.uniform(0.3, 0.4), fcy + rng.normal(0, 6)
    disc_r = rng.uniform(14, 19)
    mx, my = fcx - eye * radius * rng.uniform(0.0, 0.08), fcy + rng.normal(0, 4)
    img = img * (1.0 - 0.3 * _ellipse(mx, my, 22, 22, soft=12.0))[..., None]  # macula

    if key == "fundus_detachment":
        a = rng.uniform(0, 2 * math.pi)
        ux, uy = math.cos(a), math.sin(a)
        proj = (_XX - fcx) * ux + (_YY - fcy) * uy + 6 * _smooth_noise(rng, 4)
        region = _step(proj - radius * rng.uniform(-0.1, 0.3), 6.0)
        across = _XX * -uy + _YY * ux
        folds = 0.5 + 0.5 * np.sin(across * rng.uniform(0.18, 0.3) + 4 * _smooth_noise(rng, 5))
        grey = np.array([0.72, 0.68, 0.64], np.float32) * rng.uniform(0.85, 1.05)
        img = _blend(img, grey, region * rng.uniform(0.65, 0.85))
        img = img * (1.0 - 0.18 * region * folds)[..., None]

    vessel_img, vessels = _canvas()
    for k, base_angle in enumerate((-0.55, 0.55, -2.2, 2.2)):
        toward_macula = base_angle if eye < 0 else math.pi - base_angle
        length = rng.uniform(55, 75) if k < 2 else rng.uniform(35, 50)
        _branches(vessels, rng, dx, dy, toward_macula + rng.normal(0, 0.1), length, 4.0, 2, 255, spread=0.7)
    vessel_colour = (0.45, 0.05, 0.05) if key != "fundus_detachment" else (0.32, 0.04, 0.06)
    img = _blend(img, vessel_colour, _as_mask(vessel_img, 0.6) * 0.9)

    cup_ratio = rng.uniform(0.72, 0.9) if key == "fundus_glaucoma" else rng.uniform(0.22, 0.42)
    disc_colour = (0.96, 0.78, 0.52) if key != "fundus_glaucoma" else (0.97, 0.88, 0.74)
    _spot(img, disc_colour, dx, dy, disc_r, disc_r * rng.uniform(1.0, 1.12), soft=2.0)
    _spot(img, (1.0, 0.96, 0.88), dx + eye * disc_r * 0.1, dy, disc_r * cup_ratio,
          disc_r * cup_ratio * rng.uniform(1.0, 1.15), soft=1.5)

    if key == "fundus_diabetic":
        haemorrhages, exudates = [], []
        for _ in range(rng.integers(35, 80)):  # dots and blots
            a, d = rng.uniform(0, 2 * math.pi), radius * math.sqrt(rng.uniform(0.02, 0.75))
            size = (4.0, 7.0) if rng.random() < 0.3 else (1.5, 4.0)
            haemorrhages.append((fcx + d * math.cos(a), fcy + d * math.sin(a), *rng.uniform(*size, size=2)))
        for _ in range(rng.integers(3, 7)):  # clusters of hard exudates around the macula
            a, d = rng.uniform(0, 2 * math.pi), rng.uniform(15, 50)
            ex, ey = mx + d * math.cos(a), my + d * math.sin(a)
            for _ in range(rng.integers(4, 11)):
                x, y = ex + rng.normal(0, 5), ey + rng.normal(0, 5)
                exudates.append((x, y, *rng.uniform(1.5, 3.5, size=2)))
        img = _dots(img, (0.36, 0.03, 0.04), haemorrhages)
        img = _dots(img, (0.98, 0.9, 0.4), exudates)
        for _ in range(rng.integers(1, 5)):  # cotton-wool spots
            a, d = rng.uniform(0, 2 * math.pi), radius * rng.uniform(0.2, 0.6)
            _spot(img, (0.95, 0.9, 0.82), fcx + d * math.cos(a), fcy + d * math.sin(a),
                  *rng.uniform(4, 8, size=2), soft=3.0, alpha=0.8)

    img = img * rng.uniform(0.8, 1.15) * rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    img = img * field[..., None]
    blur = rng.uniform(0.8, 1.8) if rng.random() < 0.3 else 0.0  # out of focus
    return _finish(img, rng, noise=(0.005, 0.025), gamma=(0.8, 1.25), pose=_FUNDUS_POSE, blur=blur)


_RENDERERS = {"chest": _render_chest, "derm": _render_derm, "fundus": _render_fundus}


def write_samples(out_dir: Path, seed: int, per_class: int, by_class: bool = False) -> list[Path]:
    """Write `per_class` PNGs per class, named after the ground truth (e.g. chest_left_effusion_1.png).

    With `by_class`, each class gets a folder named by its label (the layout `medvlm evaluate`
    reads). The images are those of `generate(seed, per_class * NUM_CLASSES)`. Images whose three
    channels are equal (the radiographs) are saved as grayscale PNGs.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, key in enumerate(CLASS_KEYS):
        folder = out_dir / CLASS_LABELS[label] if by_class else out_dir
        folder.mkdir(exist_ok=True)
        for k in range(per_class):
            s = sample(seed, label + k * NUM_CLASSES)
            path = folder / (f"{key}.png" if per_class == 1 else f"{key}_{k + 1}.png")
            gray = bool((s.image == s.image[..., :1]).all())
            Image.fromarray(s.image[..., 0] if gray else s.image).save(path, optimize=True)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """CLI: write sample PNGs of every class."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("samples"), help="folder for the PNGs")
    parser.add_argument("--seed", type=int, default=7, help="data set seed of the samples")
    parser.add_argument("--per-class", type=int, default=1, help="images per class")
    parser.add_argument("--by-class", action="store_true",
                        help="one folder per class, named by its label (for medvlm evaluate)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = write_samples(args.out, args.seed, args.per_class, args.by_class)
    print(f"wrote {len(paths)} images to {args.out}")


if __name__ == "__main__":
    main()
