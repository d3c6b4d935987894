"""Command line of the build half.

  python -m engines.build --model NAME --out DIR [--weights DIR] [--force] [--precision int8[,fp16]]
  python -m engines.build quantize --bundle DIR [--calibration DIR] [--precision int8[,fp16]]
  python -m engines.build plans --bundle DIR                       (on a GPU node with TensorRT)
  python -m engines.build sign --bundle DIR --key ED25519_PRIVATE.pem
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engines.build import registry
from engines.build.bundle import BundleError, build_bundle
from engines.build.quantize import INT8_SCHEMES
from engines.runtime import manifest as mf
from engines.runtime.bundle import BundleError as RuntimeBundleError

log = logging.getLogger("engines.build")

def _parser() -> argparse.ArgumentParser:
    models = "\n".join(f"  {name:16} {kind:9} {text}" for name, kind, text in registry.summaries())
    parser = argparse.ArgumentParser(
        prog="python -m engines.build",
        description="Build a model bundle (ONNX towers, tokenizer, golden data, manifest) for the encoders.",
        epilog=f"models:\n{models}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, choices=registry.names(), help="registry name")
    parser.add_argument("--out", type=Path, default=Path("bundles"),
                        help="folder of bundles; the bundle is OUT/<model>-<version> (default: bundles)")
    parser.add_argument("--weights", type=Path, default=None,
                        help=f"weights folder (biomedclip only; default: ${registry.BIOMEDCLIP_DIR_ENV})")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder kept after the build (default: a temporary folder)")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle of the same name")
    _precision_options(parser, default="")
    _sign_option(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _sign_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sign-key", type=Path, default=None,
                        help="Ed25519 private key (PEM) to sign the finished manifest with; encoders given the "
                             "public key (--trusted-bundle-keys) refuse bundles without a valid signature")


def _sign_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engines.build sign",
        description="Sign a bundle's manifest (which lists the sha256 of every file) with an Ed25519 key, into "
                    "manifest.sig. Run it after the last step that changes the manifest (quantize, plans).",
    )
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory (holds manifest.json)")
    parser.add_argument("--key", type=Path, required=True, help="Ed25519 private key, PEM (unencrypted)")
    return parser


def _sign(bundle: Path, key: Path) -> int:
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


def _quantize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engines.build quantize",
        description="Add reduced-precision ONNX engines to a built bundle. Each variant is judged against "
                    "fp32 on held-out data (zero-shot agreement, accuracy drop, centred cosine) and timed; "
                    "the fastest that passes is kept, the others are not written.",
    )
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory (holds manifest.json)")
    _precision_options(parser, default=mf.INT8)
    _sign_option(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _plans_parser() -> argparse.ArgumentParser:
    from engines.build import plans

    parser = argparse.ArgumentParser(
        prog="python -m engines.build plans",
        description="Build TensorRT plans of a bundle for this node's GPU (strongly typed networks: fp32 from "
                    "the reference graphs, fp16 from a mixed-precision graph, int8 from the Q/DQ graph), gate "
                    "each against fp32 and add those that pass to the bundle, named per GPU architecture.",
    )
    parser.add_argument("--bundle", type=Path, required=True, help="bundle directory (holds manifest.json)")
    parser.add_argument("--precision", type=lambda t: [p for p in t.split(",") if p],
                        default=list(plans.PRECISIONS), help="plans to build (default: fp32,fp16,int8)")
    parser.add_argument("--max-batch", type=int, default=plans.MAX_BATCH,
                        help="largest batch of the optimization profile (the encoders' --max-batch)")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="held-out images for the gate, as for quantize (required for real BiomedCLIP)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _logging(verbose: bool) -> None:
    # Our loggers at INFO; libraries (open_clip logs every step on the root logger) at WARNING.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("engines").setLevel(logging.DEBUG if verbose else logging.INFO)


def _quantize(bundle: Path, args: argparse.Namespace) -> int:
    """Run the quantize step: 0 when a requested engine was kept for at least one tower (a tower
    left in fp32 is logged with its reasons), 2 when none passed (the bundle still serves fp32)."""
    from engines.build.quantize import QuantizeError, quantize_bundle

    try:
        result = quantize_bundle(bundle, calibration=args.calibration, precisions=args.precision,
                                 schemes=[s for s in args.schemes.split(",") if s], threads=args.threads)
    except (QuantizeError, BundleError, RuntimeBundleError) as exc:
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


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the build step asked for; return the process exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["quantize"]:
        args = _quantize_parser().parse_args(argv[1:])
        _logging(args.verbose)
        status = _quantize(args.bundle, args)
        if args.sign_key and status != 1:
            return _sign(args.bundle, args.sign_key) or status
        return status
    if argv[:1] == ["sign"]:
        args = _sign_parser().parse_args(argv[1:])
        _logging(False)
        return _sign(args.bundle, args.key)
    if argv[:1] == ["plans"]:
        from engines.build import plans

        args = _plans_parser().parse_args(argv[1:])
        _logging(args.verbose)
        try:
            plans.build_plans(args.bundle, precisions=args.precision, max_batch=args.max_batch,
                              calibration=args.calibration)
        except (plans.PlanError, RuntimeBundleError) as exc:
            log.error("%s", exc)
            return 1
        return 0
    args = _parser().parse_args(argv)
    _logging(args.verbose)
    try:
        path = build_bundle(
            args.model, args.out, weights=args.weights, force=args.force, workdir=args.workdir
        )
    except (registry.SourceError, BundleError) as exc:
        log.error("%s", exc)
        return 1
    print(path)
    status = _quantize(path, args) if args.precision else 0
    if args.sign_key and status != 1:
        return _sign(path, args.sign_key) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
