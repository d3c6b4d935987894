"""Build a model bundle: export both towers, check them against torch, write golden data and the manifest."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engines.build import export, registry
from engines.build.localdir import LoadedModel
from engines.runtime import manifest as mf
from engines.runtime.bundle import BundleError
from engines.runtime.text import TextTokenizer

log = logging.getLogger(__name__)

VISION_FILE = "vision.onnx"
TEXT_FILE = "text.onnx"
TOKENIZER_DIR = "tokenizer"
GOLDEN_FILE = "golden.npz"

# fp32 ONNX Runtime vs torch: per-row cosine and max |onnx - torch| relative to max |torch|.
FP32_MIN_COSINE = 0.99999
FP32_REL_TOL = 1e-4

GOLDEN_TEXTS = (
    "chest x-ray showing consolidation in the right lower lobe, consistent with pneumonia",
    "",
    "  MRI   of the brain:\tT2-weighted FLAIR,\n no acute infarct.  ",
    "Dermoscopy — melanoma? (asymmetric, 6 mm; café-au-lait macule) ✓ 肺",
    "normal frontal chest radiograph with no pleural effusion and a normal cardiac silhouette. " * 40,
)


class ParityError(BundleError):
    """ONNX Runtime outputs do not match the torch reference within tolerance."""


@dataclasses.dataclass(frozen=True)
class Parity:
    """How closely one set of engine outputs matches the torch reference."""

    case: str
    rows: int
    min_cosine: float
    max_abs_diff: float
    tolerance: float  # allowed max_abs_diff

    @property
    def ok(self) -> bool:
        return self.min_cosine >= FP32_MIN_COSINE and self.max_abs_diff <= self.tolerance


def check_parity(case: str, reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """Compare engine outputs with torch fp32 outputs row by row; raise ParityError if they differ.

    Each row must reach cosine >= FP32_MIN_COSINE, and the largest absolute difference
    must stay within FP32_REL_TOL times the largest absolute reference value.
    """
    if reference.shape != candidate.shape:
        raise ParityError(f"{case}: shape {candidate.shape} != reference {reference.shape}")
    ref = reference.astype(np.float64)  # [N, D]
    cand = candidate.astype(np.float64)  # [N, D]
    if not np.isfinite(cand).all():
        raise ParityError(f"{case}: non-finite outputs")
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)  # [N]
    cosine = (ref * cand).sum(axis=1) / np.maximum(norms, 1e-30)  # [N]
    result = Parity(
        case=case,
        rows=int(ref.shape[0]),
        min_cosine=float(cosine.min()),
        max_abs_diff=float(np.abs(ref - cand).max()),
        tolerance=float(FP32_REL_TOL * np.abs(ref).max()),
    )
    if not result.ok:
        raise ParityError(
            f"{case}: min cosine {result.min_cosine:.8f} (need >= {FP32_MIN_COSINE}), "
            f"max abs diff {result.max_abs_diff:.3g} (allowed {result.tolerance:.3g})"
        )
    return result


def golden_images() -> list[Image.Image]:
    """Deterministic synthetic images of several sizes and modes (RGB, L, RGBA), some below the crop size."""
    def grid(h: int, w: int) -> np.ndarray:
        return np.mgrid[0:h, 0:w].astype(np.float32)  # [2, h, w]

    y, x = grid(256, 320)
    rgb = np.stack([x / 320 * 255, y / 256 * 255, ((x // 32 + y // 32) % 2) * 200], axis=-1)  # [256, 320, 3]
    y, x = grid(384, 256)
    radial = 255 * np.exp(-(((x - 128) / 70) ** 2 + ((y - 170) / 110) ** 2))  # [384, 256], chest-like blob
    y, x = grid(160, 200)
    rgba = np.stack([np.full_like(x, 230), 120 + 100 * np.sin(x / 9), 60 + 50 * np.cos(y / 7),
                     np.full_like(x, 255)], axis=-1)  # [160, 200, 4]
    noise = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3))  # [480, 640, 3]
    y, x = grid(48, 64)
    small = (x * 4 + y * 2) % 256  # [48, 64]
    arrays = [(rgb, "RGB"), (radial, "L"), (rgba, "RGBA"), (noise, "RGB"), (small, "L")]
    return [Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode=m) for a, m in arrays]


def trimmed_length(input_ids: np.ndarray, pad_id: int) -> int:
    """Length of `input_ids` [N, L] once trailing columns of padding only are dropped (at least 1)."""
    used = np.nonzero((input_ids != pad_id).any(axis=0))[0]  # column indices holding a real token
    return int(used[-1]) + 1 if used.size else 1


def run_parity(
    vision_path: Path, text_path: Path, golden: dict[str, np.ndarray], *, pad_id: int
) -> list[Parity]:
    """Run the ONNX graphs with ONNX Runtime (CPU) on the golden inputs at several shapes; raise ParityError.

    Cases: full golden batch and batch 1 for both towers; for text also the batch with
    padding trimmed to its longest sequence and each row trimmed to its own length.
    """
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    vision = ort.InferenceSession(str(vision_path), providers=providers)
    text = ort.InferenceSession(str(text_path), providers=providers)

    def embed_images(images: np.ndarray) -> np.ndarray:
        return vision.run([mf.VISION_OUTPUT], {mf.VISION_INPUT: images})[0]  # [n, D]

    def embed_texts(ids: np.ndarray) -> np.ndarray:
        return text.run([mf.TEXT_OUTPUT], {mf.TEXT_INPUT: ids})[0]  # [n, D]

    images, ids = golden[mf.VISION_INPUT], golden[mf.TEXT_INPUT]  # [G, 3, H, W], [G, L]
    ref_img, ref_txt = golden[mf.VISION_OUTPUT], golden[mf.TEXT_OUTPUT]  # [G, D], [G, D]
    lengths = np.array([trimmed_length(row[None], pad_id) for row in ids])  # [G]
    short = lengths < ids.shape[1]  # rows that leave padding to trim
    longest = int(lengths[short].max(initial=1))
    one_by_one = [embed_texts(row[None, :n]) for row, n in zip(ids, lengths)]
    results = [
        check_parity(f"vision batch={len(images)}", ref_img, embed_images(images)),
        check_parity("vision batch=1", ref_img, np.concatenate([embed_images(im[None]) for im in images])),
        check_parity(f"text batch={len(ids)} L={ids.shape[1]}", ref_txt, embed_texts(ids)),
        check_parity("text batch=1 trimmed", ref_txt, np.concatenate(one_by_one)),
    ]
    if short.any():
        results.append(check_parity(f"text batch={int(short.sum())} trimmed L={longest}", ref_txt[short],
                                    embed_texts(ids[short, :longest])))
    for r in results:
        log.info("parity %-28s min cosine %.9f  max abs diff %.3g (allowed %.3g)",
                 r.case, r.min_cosine, r.max_abs_diff, r.tolerance)
    return results


def _golden(loaded: LoadedModel) -> dict[str, np.ndarray]:
    """Golden inputs through open_clip's own preprocessing and tokenizer, and the torch fp32 outputs."""
    images = torch.stack([loaded.preprocess(im) for im in golden_images()])  # [G, 3, H, W]
    input_ids = loaded.tokenizer(list(GOLDEN_TEXTS)).to(torch.int64)  # [G, context_length]
    with torch.no_grad():
        image_embeds = loaded.model.encode_image(images, normalize=False)  # [G, D]
        text_embeds = loaded.model.encode_text(input_ids, normalize=False)  # [G, D]
    return {
        mf.VISION_INPUT: images.numpy().astype(np.float32),
        mf.VISION_OUTPUT: image_embeds.numpy().astype(np.float32),
        mf.TEXT_INPUT: input_ids.numpy(),
        mf.TEXT_OUTPUT: text_embeds.numpy().astype(np.float32),
    }


def _image_spec(preprocess_cfg: dict[str, Any]) -> mf.ImageSpec:
    size = preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise BundleError(f"only square inputs are supported, model expects {height}x{width}")
    return mf.ImageSpec(
        size=int(height),
        mean=tuple(float(v) for v in preprocess_cfg["mean"]),
        std=tuple(float(v) for v in preprocess_cfg["std"]),
        interpolation=str(preprocess_cfg["interpolation"]),
        resize_mode=str(preprocess_cfg["resize_mode"]),
    )


def _file_entries(bundle: Path) -> dict[str, mf.FileEntry]:
    """Hash every file of the bundle and give it its role."""
    roles = {VISION_FILE: ("vision", "fp32"), TEXT_FILE: ("text", "fp32"), GOLDEN_FILE: ("golden", "")}
    entries = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        name = path.relative_to(bundle).as_posix()
        if name == mf.MANIFEST_NAME:
            continue
        if name.startswith(f"{TOKENIZER_DIR}/"):
            role, precision = "tokenizer", ""
        elif name in roles:
            role, precision = roles[name]
        else:
            raise BundleError(f"unexpected file {name} in bundle")
        entries[name] = mf.FileEntry(sha256=mf.sha256_file(path), role=role, precision=precision)
    return entries


def _tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import open_clip
    import timm
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _write_bundle(source: registry.ModelSource, loaded: LoadedModel, dst: Path) -> mf.Manifest:
    """Write every file of the bundle into the empty folder `dst`; raise BundleError if any check fails."""
    start = time.perf_counter()
    model, tokenizer = loaded.model, loaded.tokenizer
    image = _image_spec(loaded.preprocess_cfg)
    pad_id = int(tokenizer.tokenizer.pad_token_id)
    mask_pad_id = getattr(getattr(model.text, "config", None), "pad_token_id", None)
    if mask_pad_id != pad_id:
        raise BundleError(f"tokenizer pads with id {pad_id} but the text tower masks id {mask_pad_id}")
    text = mf.TextSpec(
        context_length=int(tokenizer.context_length), pad_id=pad_id, tokenizer_dir=TOKENIZER_DIR
    )

    golden = _golden(loaded)
    embed_dim = golden[mf.VISION_OUTPUT].shape[1]
    if golden[mf.TEXT_OUTPUT].shape[1] != embed_dim:
        raise BundleError(f"towers disagree on embed dim: {embed_dim} vs {golden[mf.TEXT_OUTPUT].shape[1]}")

    tokenizer.save_pretrained(dst / TOKENIZER_DIR)
    service_ids = TextTokenizer(dst, text).ids(list(GOLDEN_TEXTS), pad_to=text.context_length)
    if not np.array_equal(service_ids, golden[mf.TEXT_INPUT]):
        raise BundleError("the service tokenizer does not reproduce open_clip's ids on the golden texts")

    export.export_vision(model, dst / VISION_FILE, image_size=image.size)
    export.export_text(model, dst / TEXT_FILE, context_length=text.context_length, pad_id=pad_id)
    parity = run_parity(dst / VISION_FILE, dst / TEXT_FILE, golden, pad_id=pad_id)
    np.savez(dst / GOLDEN_FILE, **golden)

    manifest = mf.Manifest(
        model=source.name,
        version=source.version,
        kind=source.kind,
        embed_dim=int(embed_dim),
        logit_scale=float(model.logit_scale.exp().item()),
        opset=export.OPSET,
        image=image,
        text=text,
        files=_file_entries(dst),
        description=source.description,
        build={
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "origin": loaded.origin,
            "exporter": export.EXPORTER,
            "tools": _tool_versions(),
            "parity": {
                "reference": "torch fp32 (CPU)",
                "engine": "onnxruntime CPUExecutionProvider",
                "min_cosine_required": FP32_MIN_COSINE,
                "rel_tol": FP32_REL_TOL,
                "cases": [dataclasses.asdict(p) for p in parity],
            },
            "golden": {"images": int(golden[mf.VISION_INPUT].shape[0]), "texts": len(GOLDEN_TEXTS)},
            "seconds": round(time.perf_counter() - start, 1),
        },
    )
    (dst / mf.MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def _swap_in(staging: Path, final: Path) -> None:
    """Move the finished `staging` folder to `final`, replacing an existing bundle there."""
    if not final.exists():
        os.rename(staging, final)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
    os.rename(final, retired / final.name)
    os.rename(staging, final)
    shutil.rmtree(retired, ignore_errors=True)


def build_bundle(model: str, out_dir: Path, *, weights: Path | None = None, force: bool = False,
                 workdir: Path | None = None) -> Path:
    """Build the bundle of registered `model` as `out_dir/<model>-<version>/` and return its path.

    Everything is written to a hidden folder in `out_dir` and renamed into place only
    once every check passed, so a failed build leaves no bundle behind.

    Args:
        model: registry name ("tiny", "demo", "biomedclip-arch", "biomedclip").
        out_dir: folder holding bundles; created if missing.
        weights: a local weights folder, for models that take one (biomedclip).
        force: replace an existing bundle of the same name instead of refusing.
        workdir: scratch folder for the model source (kept, e.g. to reuse a trained demo model);
            a temporary folder that is removed afterwards when None.

    Raises:
        registry.SourceError: unknown model, or its weights cannot be obtained.
        BundleError: the bundle exists (without force), or a check failed (ParityError for parity).
    """
    source = registry.get_source(model)
    if weights is not None and not source.accepts_weights:
        raise BundleError(f"model {model!r} takes no weights folder")
    out_dir = Path(out_dir)
    final = out_dir / source.bundle_name
    if final.exists() and not force:
        raise BundleError(f"{final} already exists (use --force to replace it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{source.bundle_name}.", dir=out_dir))
    try:
        scratch = contextlib.nullcontext(workdir) if workdir is not None else tempfile.TemporaryDirectory(
            prefix="medvlm-build-")
        with scratch as work:
            work = Path(work)
            work.mkdir(parents=True, exist_ok=True)
            loaded = source.load(work, weights)
            log.info("loaded %s (%s) in %.1f s: %s", source.name, source.kind, time.perf_counter() - start,
                     loaded.origin)
            manifest = _write_bundle(source, loaded, staging)
        staging.chmod(0o755)  # mkdtemp makes it owner-only; serving processes may run as another user
        _swap_in(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("bundle %s written to %s in %.1f s", manifest.bundle_id, final, time.perf_counter() - start)
    return final
