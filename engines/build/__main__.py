"""Command line of the build half.

  python -m engines.build --model NAME --out DIR [--weights DIR] [--force] [--precision int8[,fp16]]
  python -m engines.build quantize --bundle DIR [--calibration DIR] [--precision int8[,fp16]]
  python -m engines.build plans --bundle DIR                       (on a GPU node with TensorRT)
  python -m engines.build sign --bundle DIR --key ED25519_PRIVATE.pem
  python -m engines.build calibrate --bundle DIR [--calibration DIR]
  python -m engines.build openvino --bundle DIR [--calibration DIR]  (NNCF int8 for OpenVINO on CPUs)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from engines.build import registry
from engines.build.bundle import build_bundle
from engines.build.quantize import INT8_SCHEMES
from engines.runtime import manifest as mf
from engines.runtime.bundle import BundleError
from engines.runtime.signature import SIGNATURE_NAME

log = logging.getLogger("engines.build")


def _parser() -> argparse.ArgumentParser:
    """The build command (the default) and, as subcommands, the steps run on a built bundle."""
    from engines.build import calibrate, plans

    models = "\n".join(f"  {name:16} {kind:9} {text}" for name, kind, text in registry.summaries())
    parser = argparse.ArgumentParser(
        prog="python -m engines.build",
        description="Build a model bundle (ONNX towers, tokenizer, golden data, manifest) for the encoders; "
                    "the commands below work on a built bundle (COMMAND --help for theirs).",
        epilog=f"models:\n{models}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=_build)
    parser.add_argument("--model", choices=registry.names(), help="registry name (required to build)")
    parser.add_argument("--out", type=Path, default=Path("bundles"),
                        help="folder of bundles; the bundle is OUT/<model>-<version> (default: bundles)")
    parser.add_argument("--weights", type=Path, default=None,
                        help=f"weights folder (biomedclip only; default: ${registry.BIOMEDCLIP_DIR_ENV})")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder kept after the build (default: a temporary folder)")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle of the same name")
    _precision_options(parser, default="")
    _sign_option(parser)
    _verbose_option(parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    quantize = _command(commands, "quantize", _quantize, "add gated reduced-precision ONNX engines",
                        "Add reduced-precision ONNX engines to a built bundle. Each variant is judged against "
                        "fp32 on held-out data (zero-shot agreement, accuracy drop, centred cosine) and timed; "
                        "the fastest that passes is kept, the others are not written.")
    _precision_options(quantize, default=mf.INT8)
    _sign_option(quantize)

    tensorrt = _command(commands, "plans", _plans, "build gated TensorRT plans (on a GPU node with TensorRT)",
                        "Build TensorRT plans of a bundle for this node's GPU (strongly typed networks: fp32 from "
                        "the reference graphs, fp16 from a mixed-precision graph, int8 from the Q/DQ graph), gate "
                        "each against fp32 and add those that pass to the bundle, named per GPU architecture.")
    tensorrt.add_argument("--precision", type=lambda t: [p for p in t.split(",") if p],
                          default=list(plans.PRECISIONS), help="plans to build (default: fp32,fp16,int8)")
    tensorrt.add_argument("--max-batch", type=int, default=plans.MAX_BATCH,
                          help="largest batch of the optimization profile (the encoders' --max-batch)")
    tensorrt.add_argument("--calibration", type=Path, default=None,
                          help="held-out images for the gate, as for quantize (required for real BiomedCLIP)")

    sign = _command(commands, "sign", _sign, "sign a bundle's manifest",
                    "Sign a bundle's manifest (which lists the sha256 of every file) with an Ed25519 key, into "
                    "manifest.sig. Steps run on a signed bundle (plans, quantize) leave the manifest and its "
                    "signature alone and list their files in derived.json, served only if they reproduce the "
                    "signed golden outputs.",
                    verbose=False)
    sign.add_argument("--key", type=Path, required=True, help="Ed25519 private key, PEM (unencrypted)")

    fit = _command(commands, "calibrate", _calibrate, "fit calibration.json (temperature, OOD, abstention)",
                   "Fit the bundle's calibration (temperature per label set, out-of-distribution statistics "
                   "and thresholds) on labelled images and write calibration.json beside its manifest. "
                   "The gateway serves it with --calibration; it is tied to this bundle's id.")
    fit.add_argument("--calibration", type=Path, default=None,
                     help="folder with one subfolder of images per label (the subfolder's name is the label); "
                          "required except for the demo and test models, which use the generator")
    fit.add_argument("--ood-quantile", type=float, default=calibrate.OOD_QUANTILE,
                     help="share of in-distribution calibration images (out of fold) under the "
                          "out-of-distribution threshold: higher flags fewer good images and more strange ones "
                          f"pass (default {calibrate.OOD_QUANTILE})")
    fit.add_argument("--min-probability", type=float, default=calibrate.MIN_PROBABILITY,
                     help="abstain when the best calibrated probability is below this "
                          f"(default {calibrate.MIN_PROBABILITY})")
    fit.add_argument("--per-class", type=int, default=calibrate.PER_CLASS,
                     help=f"generator images per class for the demo model (default {calibrate.PER_CLASS})")

    openvino = _command(commands, "openvino", _openvino, "add gated NNCF int8 engines for OpenVINO on CPUs",
                        "Add NNCF int8 engines for OpenVINO to a built bundle: each tower is quantized by NNCF, "
                        "judged against fp32 by the same precision gate as the ONNX Runtime variants (run on "
                        "OpenVINO) and timed against OpenVINO fp32; a tower that fails or is not faster keeps "
                        "none.")
    openvino.add_argument("--calibration", type=Path, default=None,
                          help="calibration and held-out images, as for quantize (required for real BiomedCLIP)")
    openvino.add_argument("--towers", default=",".join(mf.TOWERS), help="towers to quantize (default: vision,text)")
    openvino.add_argument("--threads", type=int, default=2, help="CPU threads for calibration, gate and timing")
    return parser


def _command(commands: argparse._SubParsersAction, name: str, run: Callable[[argparse.Namespace], int],
             summary: str, description: str, verbose: bool = True) -> argparse.ArgumentParser:
    """A subcommand on a built bundle: --bundle, -v unless told otherwise, and the function it runs."""
    parser = commands.add_parser(name, help=summary, description=description)
    parser.set_defaults(run=run)
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory (holds manifest.json)")
    if verbose:
        _verbose_option(parser)
    return parser


def _verbose_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _sign_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sign-key", type=Path, default=None,
                        help="Ed25519 private key (PEM) to sign the finished manifest with; encoders given the "
                             "public key (--trusted-bundle-keys) refuse bundles without a valid signature. Not for "
                             "a bundle signed already: what is added to it goes to derived.json, unsigned")


def _sign(args: argparse.Namespace) -> int:
    return _sign_bundle(args.bundle, args.key)


def _sign_bundle(bundle: Path, key: Path) -> int:
    from engines.build.sign import sign_bundle

    try:
        key_id = sign_bundle(bundle, key)
    except (OSError, ValueError, mf.ManifestError) as exc:
        log.error("cannot sign %s: %s", bundle, exc)
        return 1
    print(f"signed {bundle} with key {key_id}")
    return 0


def _precisions(text: str) -> list[str]:
    names = [p for p in text.split(",") if p]
    unknown = [p for p in names if p not in (mf.INT8, mf.FP16)]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown precision {unknown[0]!r}; choose int8, fp16 or int8,fp16")
    return names


def _precision_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--precision", type=_precisions, default=_precisions(default),
                        help="reduced-precision engines to add, gated against fp32: int8 (ONNX Runtime on CPU, "
                             "and TensorRT when the Q/DQ variant is kept), fp16 (GPUs), or int8,fp16"
                             + (f" (default: {default})" if default else " (default: none)"))
    parser.add_argument("--calibration", type=Path, default=None,
                        help="folder of images (optionally one subfolder per class) and *.txt texts of the "
                             "model's domain, to calibrate and judge int8; required for real BiomedCLIP, "
                             "the generator is used for the demo model")
    parser.add_argument("--schemes", default=",".join(INT8_SCHEMES),
                        help="int8 variants to try: dynamic (ONNX Runtime only), qdq (ONNX Runtime and TensorRT)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for calibration, gate and timing")


def _openvino(args: argparse.Namespace) -> int:
    """0 when at least one tower kept an int8 engine for OpenVINO, 2 when none passed, 1 on errors."""
    from engines.build.openvino_int8 import quantize_openvino
    from engines.build.quantize import QuantizeError

    try:
        result = quantize_openvino(args.bundle, calibration=args.calibration, threads=args.threads,
                                   towers=[t for t in args.towers.split(",") if t])
    except (QuantizeError, BundleError) as exc:
        log.error("%s", exc)
        return 1
    for v in result.variants:
        print(f"{'kept' if v.kept else 'not kept'} {v.tower} int8 nncf: {v.note}; {v.report.summary()}")
    return 0 if result.kept else 2


def _logging(verbose: bool) -> None:
    # Our loggers at INFO; libraries (open_clip logs every step on the root logger) at WARNING.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("engines").setLevel(logging.DEBUG if verbose else logging.INFO)


def _build(args: argparse.Namespace) -> int:
    """Build the bundle, then add what --precision asks for and sign it when --sign-key is given."""
    try:
        path = build_bundle(args.model, args.out, weights=args.weights, force=args.force, workdir=args.workdir)
    except (registry.SourceError, BundleError) as exc:
        log.error("%s", exc)
        return 1
    print(path)
    status = _quantize_bundle(path, args) if args.precision else 0
    if args.sign_key and status != 1:
        return _sign_bundle(path, args.sign_key) or status
    return status


def _quantize(args: argparse.Namespace) -> int:
    if args.sign_key and (args.bundle / SIGNATURE_NAME).is_file():
        log.error("%s is signed already: quantize adds its engines to derived.json, which no signature covers "
                  "(they are served only if they reproduce the signed golden outputs); run it without --sign-key",
                  args.bundle)
        return 1
    status = _quantize_bundle(args.bundle, args)
    if args.sign_key and status != 1:
        return _sign_bundle(args.bundle, args.sign_key) or status
    return status


def _quantize_bundle(bundle: Path, args: argparse.Namespace) -> int:
    """Run the quantize step: 0 when a requested engine was kept for at least one tower (a tower
    left in fp32 is logged with its reasons), 2 when none passed (the bundle still serves fp32)."""
    from engines.build.quantize import QuantizeError, quantize_bundle

    try:
        result = quantize_bundle(bundle, calibration=args.calibration, precisions=args.precision,
                                 schemes=[s for s in args.schemes.split(",") if s], threads=args.threads)
    except (QuantizeError, BundleError) as exc:
        log.error("%s", exc)
        return 1
    missing = [f"{t}.{p}" for p in args.precision for t in mf.TOWERS if f"{t}.{p}" not in result.kept]
    for key in sorted(result.kept):
        print(f"kept {result.kept[key].name} ({result.kept[key].scheme}): {result.kept[key].report.summary()}")
    if missing:
        (log.warning if result.kept else log.error)(
            "no %s engine passed the gate for %s; the bundle serves fp32 there (reasons above)",
            "/".join(args.precision), ", ".join(missing))
    return 0 if result.kept else 2


def _plans(args: argparse.Namespace) -> int:
    from engines.build import plans

    try:
        plans.build_plans(args.bundle, precisions=args.precision, max_batch=args.max_batch,
                          calibration=args.calibration)
    except (plans.PlanError, BundleError) as exc:
        log.error("%s", exc)
        return 1
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from engines.build import calibrate

    try:
        print(calibrate.calibrate_bundle(args.bundle, args.calibration, ood_quantile=args.ood_quantile,
                                         min_probability=args.min_probability, per_class=args.per_class))
    except (calibrate.CalibrateError, BundleError) as exc:
        log.error("%s", exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the build step asked for; return the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.run is _build and args.model is None:
        parser.error("the following arguments are required: --model (or a COMMAND)")
    _logging(getattr(args, "verbose", False))
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
