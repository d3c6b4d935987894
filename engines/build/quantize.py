"""Reduced-precision ONNX graphs of a bundle (int8 dynamic, int8 static Q/DQ, mixed fp16), each gated
against fp32 on held-out data; the fastest passing int8 variant per tower is added to the bundle
(to derived.json when the bundle is signed: engines/build/amend.py).

`python -m engines.build quantize --bundle bundles/demo-synthetic-1 [--calibration DIR]`
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from engines.build import gate as gates
from engines.build import synthetic
from engines.build.amend import amend_bundle
from engines.build.bundle import trimmed_length
from engines.runtime import manifest as mf
from engines.runtime.bundle import TOWER_TENSORS, Bundle, load_bundle
from engines.runtime.onnx import OnnxRuntimeEngine
from engines.runtime.text import TextTokenizer

log = logging.getLogger(__name__)

CALIBRATION_SEED = 1001  # generator data set of calibration images; never used for training or evaluation
EVAL_SEED = 1000  # the demo model's reported held-out set (engines.build.demo_eval.EVAL_SEED)
EVAL_PER_CLASS = 25  # 14 classes -> 350 held-out images
CALIBRATION_IMAGES = 112
CALIBRATION_TEXTS = 192
EVAL_TEXTS = 256
TEMPLATES = ("{}", "an image showing {}")  # the demo evaluation's plain and held-out templates
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# A Q/DQ graph runs on ONNX Runtime and TensorRT alike, so one gated artifact serves CPU and GPU.
# It is kept over a faster CPU-only variant unless that one is more than this much faster.
QDQ_PREFERENCE = 0.15
# A reduced-precision graph must be at least this much faster than fp32 on this CPU to be kept.
MIN_SPEEDUP = 1.05
INT8_SCHEMES = (mf.SCHEME_DYNAMIC, mf.SCHEME_QDQ)
HEAVY_OPS = ("MatMul", "Gemm", "Conv")  # quantized or run in fp16; everything else stays fp32


class QuantizeError(RuntimeError):
    """Reduced-precision engines could not be made or none passed where one was required."""


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class PrecisionData:
    """Calibration inputs (for static int8) and the held-out set the gate judges on."""

    calibration_images: np.ndarray  # float32 [M, 3, H, W]
    calibration_texts: list[np.ndarray]  # int64 [B, L] batches
    evaluation: gates.EvalSet


def _image_transform(spec: mf.ImageSpec) -> Callable[[Image.Image], np.ndarray]:
    """open_clip's own eval preprocessing of the bundle's image spec: PIL image -> [3, H, W]."""
    import open_clip

    transform = open_clip.image_transform(spec.size, is_train=False, mean=spec.mean, std=spec.std,
                                          resize_mode=spec.resize_mode, interpolation=spec.interpolation)
    return lambda image: transform(image).numpy().astype(np.float32)


def _texts(tokenizer: TextTokenizer, texts: Sequence[str], batch: int = 32) -> list[np.ndarray]:
    """Token ids in batches, each padded to its own longest text."""
    return [tokenizer.ids(list(texts[i:i + batch])) for i in range(0, len(texts), batch)]


def builtin_texts() -> list[str]:
    """Medical-style captions of the synthetic generator, in a fixed order."""
    captions = synthetic.all_captions()
    rng = np.random.default_rng(CALIBRATION_SEED)
    return [captions[i] for i in rng.permutation(len(captions))]


def demo_data(bundle: Bundle) -> PrecisionData:
    """Generator images: a calibration set and the demo's held-out evaluation set with labels."""
    transform = _image_transform(bundle.manifest.image)
    tokenizer = TextTokenizer(bundle.path, bundle.manifest.text)

    def preprocess(images: np.ndarray) -> np.ndarray:
        return np.stack([transform(Image.fromarray(im)) for im in images])  # [N, 3, H, W]

    calib, _ = synthetic.generate(CALIBRATION_SEED, CALIBRATION_IMAGES)
    held_out, labels = synthetic.generate(EVAL_SEED, EVAL_PER_CLASS * synthetic.NUM_CLASSES)
    texts = builtin_texts()
    return PrecisionData(
        calibration_images=preprocess(calib),
        calibration_texts=_texts(tokenizer, texts[:CALIBRATION_TEXTS]),
        evaluation=gates.EvalSet(
            images=preprocess(held_out),
            prompt_sets=tuple(tokenizer.ids([t.format(c) for c in synthetic.CLASS_LABELS]) for t in TEMPLATES),
            templates=TEMPLATES,
            texts=tokenizer.ids(texts[-EVAL_TEXTS:]),
            labels=labels,
            description=f"synthetic generator: calibration seed {CALIBRATION_SEED} ({CALIBRATION_IMAGES} images), "
                        f"held-out seed {EVAL_SEED} ({len(labels)} images, labels)",
        ),
    )


def folder_data(bundle: Bundle, folder: Path) -> PrecisionData:
    """Images (and texts) a user supplies, for a model the generator means nothing to.

    Every image file under `folder` is used; alternating files calibrate and evaluate. Images
    in subfolders are labelled by the subfolder's name (e.g. `DIR/cardiomegaly/001.png`), which
    makes the gate also compare zero-shot accuracy; without subfolders, agreement is measured
    on the names of the generator's classes. Lines of `*.txt` files are calibration and
    evaluation texts, after the built-in captions.
    """
    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(paths) < 8:
        raise QuantizeError(f"calibration folder {folder} holds {len(paths)} images; give at least 8 "
                            f"({', '.join(IMAGE_SUFFIXES)})")
    transform = _image_transform(bundle.manifest.image)
    tokenizer = TextTokenizer(bundle.path, bundle.manifest.text)
    images = np.stack([transform(Image.open(p).convert("RGB")) for p in paths])  # [N, 3, H, W]
    classes = sorted({p.parent.name for p in paths if p.parent != folder})
    labelled = len(classes) >= 2 and all(p.parent != folder for p in paths)
    names = classes if labelled else list(synthetic.CLASS_LABELS)
    labels = np.array([classes.index(p.parent.name) for p in paths]) if labelled else None
    user_texts = [line.strip() for p in sorted(folder.rglob("*.txt")) for line in p.read_text().splitlines()
                  if line.strip()]
    texts = user_texts + builtin_texts()
    calib, held = slice(0, None, 2), slice(1, None, 2)
    return PrecisionData(
        calibration_images=images[calib],
        calibration_texts=_texts(tokenizer, texts[calib][:CALIBRATION_TEXTS]),
        evaluation=gates.EvalSet(
            images=images[held],
            prompt_sets=tuple(tokenizer.ids([t.format(c) for c in names]) for t in TEMPLATES),
            templates=TEMPLATES,
            texts=tokenizer.ids(texts[held][:EVAL_TEXTS]),
            labels=labels[held] if labels is not None else None,
            description=f"calibration folder {folder.name}: {len(paths)} images, every other one held out"
                        + (f", {len(classes)} labelled classes" if labelled else ", no labels")
                        + f", {len(user_texts)} texts of its own",
        ),
    )


def golden_data(bundle: Bundle) -> PrecisionData:
    """The bundle's golden inputs as the held-out set, for a model with no data of its own here.

    Five images and texts judge little; TensorRT plans of a clinical bundle fall back to it when
    the plans Job has no calibration folder (their int8 comes from a graph already gated on one).
    """
    golden = bundle.golden()
    tokenizer = TextTokenizer(bundle.path, bundle.manifest.text)
    images = golden[mf.VISION_INPUT]
    texts = [tokenizer.ids(list(builtin_texts()[:EVAL_TEXTS]))]
    return PrecisionData(
        calibration_images=images,
        calibration_texts=texts,
        evaluation=gates.EvalSet(
            images=images,
            prompt_sets=tuple(tokenizer.ids([t.format(c) for c in synthetic.CLASS_LABELS]) for t in TEMPLATES),
            templates=TEMPLATES,
            texts=texts[0],
            labels=None,
            description=f"the bundle's golden set ({len(images)} images, no labels) and {EVAL_TEXTS} built-in texts",
        ),
    )


def precision_data(bundle: Bundle, calibration: Path | None, *, golden_fallback: bool = False) -> PrecisionData:
    """The user's folder when given; the generator for the demo model; the golden set where
    `golden_fallback` allows it (plans); otherwise refuse."""
    if calibration is not None:
        return folder_data(bundle, calibration)
    if bundle.manifest.kind in (mf.KIND_DEMO, mf.KIND_TEST, mf.KIND_BENCHMARK):
        return demo_data(bundle)
    if golden_fallback:
        return golden_data(bundle)
    raise QuantizeError(
        f"{bundle.manifest.model} needs calibration images of its own domain: pass --calibration DIR "
        "(image files, optionally in one subfolder per class, and *.txt files of texts)"
    )


# ----------------------------------------------------------------------------- graphs


def prepare_graph(src: Path, dst: Path) -> Path:
    """ONNX Runtime's pre-processing for quantization: constant folding and shape inference.

    Symbolic shape inference is skipped: it fails on the exporter's Constant nodes (both towers).
    """
    from onnxruntime.quantization import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def quantize_dynamic_graph(prepared: Path, dst: Path) -> Path:
    """int8 weights, activations quantized per call (MatMulInteger): ONNX Runtime only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                     weight_type=QuantType.QInt8, per_channel=False)
    return dst


class _Batches:
    """onnxruntime.quantization.CalibrationDataReader over a list of input batches."""

    def __init__(self, name: str, batches: Sequence[np.ndarray]) -> None:
        self._items = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax calibration
        raise NotImplementedError


def quantize_qdq_graph(prepared: Path, dst: Path, input_name: str, batches: Sequence[np.ndarray]) -> Path:
    """Static int8 with explicit Q/DQ nodes around MatMul/Gemm/Conv: symmetric int8 activations
    and per-channel symmetric weights, the form TensorRT builds int8 kernels from (it refuses
    non-zero zero points), calibrated by min/max over `batches`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(prepared), str(dst), _Batches(input_name, batches),
        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(HEAVY_OPS), per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return dst


def mixed_fp16_graph(prepared: Path, dst: Path) -> Path:
    """MatMul, Gemm and Conv in fp16 (weights stored fp16, inputs cast), everything else fp32.

    LayerNorm, Softmax, GELU, residual adds and reductions keep fp32, as ModelOpt AutoCast
    would keep them; graph inputs and outputs stay fp32. TensorRT builds such a strongly typed
    graph with fp16 tensor-core kernels for the matmuls.
    """
    model = onnx.load(str(prepared))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    halves: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        if node.op_type not in HEAVY_OPS:
            nodes.append(node)
            continue
        inputs = []
        for k, name in enumerate(node.input):
            if name in weights and weights[name].data_type == TensorProto.FLOAT:
                if name not in halves:
                    halves[name] = f"{name}.fp16"
                    graph.initializer.append(numpy_helper.from_array(
                        numpy_helper.to_array(weights[name]).astype(np.float16), halves[name]))
                inputs.append(halves[name])
            elif name:
                cast = f"{node.name or node.output[0]}.in{k}.fp16"
                nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT16, name=cast))
                inputs.append(cast)
            else:
                inputs.append(name)
        half = helper.make_node(node.op_type, inputs, [f"{o}.fp16" for o in node.output], name=node.name)
        half.attribute.extend(node.attribute)
        nodes.append(half)
        nodes += [helper.make_node("Cast", [f"{o}.fp16"], [o], to=TensorProto.FLOAT, name=f"{o}.fp32")
                  for o in node.output]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # stale fp32 types of the cast tensors; shapes are re-inferred on load
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


# ----------------------------------------------------------------------------- measuring


def open_cpu(path: Path, tower: str, precision: str, threads: int) -> OnnxRuntimeEngine:
    input_name, output_name = TOWER_TENSORS[tower]
    return OnnxRuntimeEngine(path, input_name=input_name, output_name=output_name, precision=precision,
                             intra_op_threads=threads, max_batch=32)


def latencies_ms(engines: dict[str, Callable[[np.ndarray], np.ndarray]], example: np.ndarray,
                 rounds: int = 7, per_round: int = 10) -> dict[str, float]:
    """Median latency of one call per engine, measured in interleaved rounds so that load from
    other processes on a shared machine hits every engine alike."""
    for infer in engines.values():
        infer(example)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, infer in engines.items():
            for _ in range(per_round):
                start = time.perf_counter()
                infer(example)
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def latency_example(tower: str, data: gates.EvalSet, pad_id: int) -> np.ndarray:
    """Batch-1 input of a tower: one held-out image, or one class prompt without its padding."""
    if tower == "vision":
        return data.images[:1]  # [1, 3, H, W]
    prompt = data.prompt_sets[0][:1]  # [1, L]
    return prompt[:, : trimmed_length(prompt, pad_id)]


# ----------------------------------------------------------------------------- the build step


@dataclasses.dataclass
class Variant:
    """One reduced-precision graph of one tower and its verdict."""

    tower: str
    precision: str
    scheme: str
    path: Path
    report: gates.GateReport
    latency_ms: float | None = None
    kept: bool = False
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.tower}.{self.precision}.onnx"

    def record(self) -> dict[str, Any]:
        return {"tower": self.tower, "precision": self.precision, "scheme": self.scheme,
                "latency_ms_b1": None if self.latency_ms is None else round(self.latency_ms, 2),
                "kept": self.kept, "note": self.note, "gate": self.report.to_dict()}


def _choose(variants: list[Variant], fp32_ms: float) -> Variant | None:
    """The fastest passing variant that beats fp32, preferring Q/DQ unless another is much faster."""
    usable = []
    for v in variants:
        if not v.report.passed:
            v.note = "failed the gate"
        elif v.latency_ms is None or v.latency_ms * MIN_SPEEDUP > fp32_ms:
            v.note = f"not faster than fp32 ({v.latency_ms:.2f} vs {fp32_ms:.2f} ms at batch 1)"
        else:
            usable.append(v)
    if not usable:
        return None
    best = min(usable, key=lambda v: v.latency_ms)
    qdq = [v for v in usable if v.scheme == mf.SCHEME_QDQ]
    if qdq and best.scheme != mf.SCHEME_QDQ and qdq[0].latency_ms <= best.latency_ms * (1 + QDQ_PREFERENCE):
        best = qdq[0]
    for v in usable:
        v.note = "kept: fastest that passed" if v is best else f"passed; {best.scheme} kept"
    return best


def _golden_entry(v: Variant) -> mf.FileEntry:
    return mf.FileEntry(sha256="", role=v.tower, precision=v.precision, scheme=v.scheme,
                        golden_min_cosine=gates.golden_tolerance(v.report.golden[v.tower]))


@dataclasses.dataclass
class QuantizeResult:
    """What the build step kept, and every variant it judged."""

    bundle: Path
    variants: list[Variant]
    kept: dict[str, Variant]  # "<tower>.<precision>" -> variant
    combination: gates.GateReport | None
    fp32_ms: dict[str, float]


def quantize_bundle(
    bundle_dir: Path,
    *,
    calibration: Path | None = None,
    precisions: Sequence[str] = (mf.INT8,),
    schemes: Sequence[str] = INT8_SCHEMES,
    towers: Sequence[str] = mf.TOWERS,
    gate: mf.PrecisionGate | None = None,
    threads: int = 2,
    calibration_override: Callable[[PrecisionData], PrecisionData] | None = None,
) -> QuantizeResult:
    """Make, gate and time reduced-precision graphs of a built bundle; add those that earn it.

    int8: each scheme in `schemes` is made per tower and judged with the other tower in fp32;
    the fastest that passes and beats fp32 is kept as `<tower>.int8.onnx`. fp16 (mixed, for
    GPUs: it is slower than fp32 on a CPU) is kept when it passes. Kept towers are then judged
    together as a service pair serves them; if the pair fails, the weaker tower is dropped.
    A variant that is not kept is not written; every verdict is logged and recorded in the
    bundle's build record. `calibration_override` edits the data (tests use it to calibrate
    on blank images).
    """
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    gate = gate or manifest.precision_gate
    started = time.perf_counter()
    data = precision_data(bundle, calibration)
    if calibration_override is not None:
        data = calibration_override(data)
    evaluation = data.evaluation
    golden = bundle.golden()
    reference = {t: open_cpu(bundle.engine_file(t), t, mf.FP32, threads) for t in mf.TOWERS}
    ref_out = gates.embed(evaluation, reference["vision"].infer_all, reference["text"].infer_all)
    log.info("precision gate data: %s", evaluation.description)

    variants: list[Variant] = []
    kept: dict[str, Variant] = {}
    fp32_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="medvlm-quantize-") as tmp:
        work = Path(tmp)
        for tower in towers:
            input_name, _ = TOWER_TENSORS[tower]
            prepared = prepare_graph(bundle.engine_file(tower), work / f"{tower}.prepared.onnx")
            made: list[tuple[str, str, Path]] = []
            if mf.INT8 in precisions:
                for scheme in schemes:
                    path = work / f"{tower}.int8.{scheme}.onnx"
                    if scheme == mf.SCHEME_DYNAMIC:
                        made.append((mf.INT8, scheme, quantize_dynamic_graph(prepared, path)))
                    elif scheme == mf.SCHEME_QDQ:
                        calib = ([data.calibration_images[i:i + 16] for i in range(0, len(data.calibration_images), 16)]
                                 if tower == "vision" else data.calibration_texts)
                        made.append((mf.INT8, scheme, quantize_qdq_graph(prepared, path, input_name, calib)))
                    else:
                        raise QuantizeError(f"unknown int8 scheme {scheme!r}; known: {', '.join(INT8_SCHEMES)}")
            if mf.FP16 in precisions:
                made.append((mf.FP16, mf.SCHEME_MIXED_FP16, mixed_fp16_graph(prepared, work / f"{tower}.fp16.onnx")))
            engines = {}
            for precision, scheme, path in made:
                engine = open_cpu(path, tower, precision, threads)
                report = gates.judge(f"{tower} {precision} {scheme}", evaluation, ref_out, gate,
                                     golden=golden, **{tower: engine.infer_all})
                log.info("gate %s", report.summary())
                variants.append(Variant(tower, precision, scheme, path, report))
                engines[f"{precision}/{scheme}"] = engine.infer
            timed = latencies_ms({"fp32": reference[tower].infer, **engines},
                                 latency_example(tower, evaluation, manifest.text.pad_id))
            fp32_ms[tower] = timed.pop("fp32")
            for v in variants[-len(made):] if made else []:
                v.latency_ms = timed[f"{v.precision}/{v.scheme}"]
                log.info("latency %s %s %s: %.2f ms at batch 1 (fp32 %.2f ms)", tower, v.precision, v.scheme,
                         v.latency_ms, fp32_ms[tower])
            tower_variants = [v for v in variants if v.tower == tower]
            best_int8 = _choose([v for v in tower_variants if v.precision == mf.INT8], fp32_ms[tower])
            if best_int8 is not None:
                kept[f"{tower}.{mf.INT8}"] = best_int8
            for v in tower_variants:
                if v.precision == mf.FP16:
                    v.note = "kept (for GPUs)" if v.report.passed else "failed the gate"
                    if v.report.passed:
                        kept[f"{tower}.{mf.FP16}"] = v
        combination = _judge_pair(kept, evaluation, ref_out, gate, threads)
        for v in kept.values():
            v.kept = True
            if v.note.startswith("passed"):
                v.note = "kept"
        for v in variants:
            log.log(logging.INFO if v.kept else logging.WARNING, "%s %s (%s): %s", "kept" if v.kept else "not kept",
                    v.name, v.scheme, v.note if v.report.passed else "; ".join(v.report.failures))
        added = {v.name: (v.path, _golden_entry(v)) for v in kept.values()}
        record = {
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "data": evaluation.description,
            "reference": "onnxruntime CPUExecutionProvider fp32 (the bundle's reference graphs)",
            "threads": threads,
            "fp32_latency_ms_b1": {t: round(ms, 2) for t, ms in fp32_ms.items()},
            "variants": [v.record() for v in variants],
            "combination": combination.to_dict() if combination is not None else None,
            "seconds": round(time.perf_counter() - started, 1),
        }
        judged = {(v.tower, v.precision) for v in variants}
        amend_bundle(
            bundle.path, added,
            remove=lambda name, e: (e.role in mf.TOWERS and (e.role, e.precision) in judged and e.precision != mf.FP32
                                    and e.scheme != mf.SCHEME_NNCF),  # OpenVINO's own int8 stays
            build=lambda build: build.__setitem__("precision", record),
            precision_gate=gate,
        )
    return QuantizeResult(bundle.path, variants, kept, combination, fp32_ms)


def _judge_pair(kept: dict[str, Variant], evaluation: gates.EvalSet, ref_out: gates.Embeddings,
                gate: mf.PrecisionGate, threads: int) -> gates.GateReport | None:
    """Judge kept towers of the same precision together; drop the weaker tower of a failing pair."""
    last = None
    for precision in (mf.INT8, mf.FP16):
        pair = {t: kept.get(f"{t}.{precision}") for t in mf.TOWERS}
        if not all(pair.values()):
            continue
        engines = {t: open_cpu(v.path, t, precision, threads).infer_all for t, v in pair.items()}
        report = gates.judge(f"vision+text {precision}", evaluation, ref_out, gate, **engines)
        log.info("gate %s", report.summary())
        last = report
        if not report.passed:
            weaker = min(pair.values(), key=lambda v: v.report.agreement)
            weaker.note = f"passed alone, dropped: the {precision} pair failed ({'; '.join(report.failures)})"
            del kept[f"{weaker.tower}.{precision}"]
    return last
