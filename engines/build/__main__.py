"""Command line: `python -m engines.build --model NAME --out DIR [--weights DIR] [--force]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engines.build import registry
from engines.build.bundle import BundleError, build_bundle

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
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the bundle, print its path; return the process exit status."""
    args = _parser().parse_args(argv)
    # Our loggers at INFO; libraries (open_clip logs every step on the root logger) at WARNING.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("engines").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        path = build_bundle(
            args.model, args.out, weights=args.weights, force=args.force, workdir=args.workdir
        )
    except (registry.SourceError, BundleError) as exc:
        log.error("%s", exc)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
