"""int8 engines for OpenVINO: NNCF post-training quantization of a bundle's fp32 graphs, judged by the
same precision gate as the ONNX Runtime int8 variants, run on OpenVINO itself; kept only if it
passes and beats OpenVINO fp32 on this CPU.

`python -m engines.build openvino --bundle bundles/demo-synthetic-1 [--calibration DIR]`

A kept tower adds two files, OpenVINO's IR of the quantized graph (`<tower>.int8.nncf.xml`, role
the tower, scheme "nncf") and its weights (`<tower>.int8.nncf.bin`, role "ir-weights"). NNCF's
ONNX backend cannot take this project's dynamo exports (its graph passes fail on them), so NNCF
quantizes OpenVINO's model of the ONNX graph and the result is stored as IR. Only OpenVINO runs
these files; NNCF (and torch, which it imports) is needed here only, never by the services.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engines.build import gate as gates
from engines.build import quantize
from engines.build.amend import amend_bundle
from engines.runtime import manifest as mf
from engines.runtime.bundle import TOWER_TENSORS, load_bundle
from engines.runtime.openvino import OpenVinoEngine

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8


@dataclasses.dataclass
class OpenVinoResult:
    """What the step kept (tower -> variant) and every variant it judged."""

    bundle: Path
    variants: list[quantize.Variant]
    kept: dict[str, quantize.Variant]
    fp32_ms: dict[str, float]


def file_names(tower: str) -> tuple[str, str]:
    """Bundle names of a tower's NNCF int8 IR: (graph, weights)."""
    return f"{tower}.int8.{mf.SCHEME_NNCF}.xml", f"{tower}.int8.{mf.SCHEME_NNCF}.bin"


def nncf_int8(onnx_path: Path, out_xml: Path, tower: str, batches: Sequence[np.ndarray]) -> Path:
    """NNCF post-training int8 (transformer preset: attention's softmax and layer norms kept in
    floating point) of an ONNX graph, calibrated on `batches`; written as OpenVINO IR."""
    import nncf
    import openvino as ov

    input_name, _ = TOWER_TENSORS[tower]
    model = ov.Core().read_model(str(onnx_path))
    dataset = nncf.Dataset(list(batches), lambda batch: {input_name: batch})
    quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=sum(len(b) for b in batches))
    # compress_to_fp16 off: unquantized weights stay fp32, as the gate judged them
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return out_xml


def quantize_openvino(
    bundle_dir: Path,
    *,
    calibration: Path | None = None,
    towers: Sequence[str] = mf.TOWERS,
    gate: mf.PrecisionGate | None = None,
    threads: int = 2,
) -> OpenVinoResult:
    """Make, gate and time an NNCF int8 engine per tower on OpenVINO; add those that earn it.

    The reference is the bundle's fp32 graph on ONNX Runtime, as for every other variant. A tower
    whose variant fails the gate or is not faster than OpenVINO fp32 at batch 1 keeps no int8 file
    for OpenVINO (an older one is removed); every verdict is logged and recorded in the manifest's
    build record under "precision_openvino".
    """
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    gate = gate or manifest.precision_gate
    started = time.perf_counter()
    data = quantize.precision_data(bundle, calibration)
    evaluation = data.evaluation
    golden = bundle.golden()
    reference = {t: quantize.open_cpu(bundle.engine_file(t), t, mf.FP32, threads) for t in mf.TOWERS}
    ref_out = gates.embed(evaluation, reference["vision"].infer_all, reference["text"].infer_all)
    log.info("precision gate data: %s", evaluation.description)
    variants: list[quantize.Variant] = []
    kept: dict[str, quantize.Variant] = {}
    fp32_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="medvlm-openvino-") as tmp:
        work = Path(tmp)
        for tower in towers:
            input_name, output_name = TOWER_TENSORS[tower]
            batches = ([data.calibration_images[i:i + CALIBRATION_BATCH]
                        for i in range(0, len(data.calibration_images), CALIBRATION_BATCH)]
                       if tower == "vision" else data.calibration_texts)
            xml, _ = file_names(tower)
            path = nncf_int8(bundle.engine_file(tower), work / xml, tower, batches)
            engines = {precision: OpenVinoEngine(p, input_name=input_name, output_name=output_name,
                                                 precision=precision, threads=threads)
                       for precision, p in ((mf.FP32, bundle.engine_file(tower)), (mf.INT8, path))}
            report = gates.judge(f"{tower} int8 nncf (OpenVINO)", evaluation, ref_out, gate, golden=golden,
                                 **{tower: engines[mf.INT8].infer_all})
            log.info("gate %s", report.summary())
            variant = quantize.Variant(tower, mf.INT8, mf.SCHEME_NNCF, path, report)
            variants.append(variant)
            timed = quantize.latencies_ms({p: e.infer for p, e in engines.items()},
                                          quantize.latency_example(tower, evaluation, manifest.text.pad_id))
            fp32_ms[tower], variant.latency_ms = timed[mf.FP32], timed[mf.INT8]
            log.info("latency %s OpenVINO int8 nncf: %.2f ms at batch 1 (OpenVINO fp32 %.2f ms)", tower,
                     variant.latency_ms, fp32_ms[tower])
            if quantize._choose([variant], fp32_ms[tower]) is not None:
                variant.kept, variant.note = True, "kept: passed and faster than OpenVINO fp32"
                kept[tower] = variant
            log.log(logging.INFO if variant.kept else logging.WARNING, "%s %s: %s",
                    "kept" if variant.kept else "not kept", xml,
                    variant.note if report.passed else "; ".join(report.failures))
            for engine in engines.values():
                engine.close()
        added = {}
        for tower, v in kept.items():
            xml, weights = file_names(tower)
            tolerance = gates.golden_tolerance(v.report.golden[tower])
            added[xml] = (v.path, mf.FileEntry(sha256="", role=tower, precision=mf.INT8, scheme=mf.SCHEME_NNCF,
                                               golden_min_cosine=tolerance))
            added[weights] = (v.path.with_suffix(".bin"), mf.FileEntry(sha256="", role=mf.WEIGHTS_ROLE,
                                                                       precision=mf.INT8, source=xml))
        record = {
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "data": evaluation.description,
            "reference": "onnxruntime CPUExecutionProvider fp32 (the bundle's reference graphs)",
            "engine": "openvino CPU (gated and timed on it)",
            "threads": threads,
            "openvino_fp32_latency_ms_b1": {t: round(ms, 2) for t, ms in fp32_ms.items()},
            "variants": [v.record() for v in variants],
            "seconds": round(time.perf_counter() - started, 1),
        }
        judged = {v.tower for v in variants}
        amend_bundle(
            bundle.path, added,
            remove=lambda name, e: e.scheme == mf.SCHEME_NNCF and e.role in judged
            or e.role == mf.WEIGHTS_ROLE and e.source in {file_names(t)[0] for t in judged},
            build=lambda build: build.__setitem__("precision_openvino", record),
        )
    return OpenVinoResult(bundle.path, variants, kept, fp32_ms)
