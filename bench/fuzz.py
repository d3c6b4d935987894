"""Coverage-guided fuzzing (atheris / libFuzzer) of what reads untrusted bytes.

python -m bench.fuzz --minutes 10          (make fuzz MINUTES=10): every target, time split evenly
python -m bench.fuzz --target image ...    one target in this process (what the parent runs)

Targets: `image` (format sniffing, PNG/JPEG/DICOM decoding (DICOM seeds included) and preprocessing, as the vision
encoder runs them), `text` (the gateway's text checks and the bundle's tokenizer), `request`
(a gateway request as protobuf bytes, then every check the gateway makes before calling an
encoder). The only acceptable failure is the domain's InvalidInput (or a protobuf DecodeError
for bytes that are not a message); anything else is a finding: libFuzzer stops, writes the
input to <out>/crash-*, and the input belongs in tests/ as a regression case once fixed.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("image", "text", "request")
MIN_RUNS = 10_000


def _seeds(target: str) -> list[bytes]:
    from bench.stress import CHEST, sample_images

    if target == "image":
        from PIL import Image

        seeds = sample_images()[:3]
        for fmt, mode in (("JPEG", "RGB"), ("PNG", "L"), ("PNG", "I;16"), ("PNG", "P")):
            buf = io.BytesIO()
            Image.new(mode, (37, 29), 200 if mode != "I;16" else 3000).save(buf, format=fmt)
            seeds.append(buf.getvalue())
        import numpy as np

        from scripts.make_dicom_samples import dicom_file

        ramp = (np.arange(31 * 23, dtype=np.uint16).reshape(23, 31) * 5) % 4096  # [H, W] 12-bit
        seeds.append(dicom_file(ramp))
        seeds.append((ROOT / "samples" / "chest_left_effusion.dcm").read_bytes())
        return seeds
    if target == "text":
        return [label.encode() for label in CHEST] + ["a photo of {}".encode(), "Ø &amp; ﬁ".encode()]
    from medvlm.v1 import gateway_pb2, types_pb2

    return [gateway_pb2.ClassifyRequest(image=types_pb2.Image(data=sample_images()[0][:300]), labels=CHEST[:3],
                                        template="an image of {}", top_k=2).SerializeToString()]


def image_target():
    """One fuzz input -> the vision encoder's preparation of it."""
    from medvlm.imaging.limits import DecodeLimits
    from medvlm.imaging.preprocess import configure_pillow
    from medvlm.imaging.spec import ImageSpec
    from services.domain import InvalidInput
    from services.vision.encoder import ImagePreparer

    configure_pillow(4_000_000)
    preparer = ImagePreparer(ImageSpec(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                             DecodeLimits(max_bytes=1 << 20, max_pixels=4_000_000))

    def one(data: bytes) -> None:
        try:
            rows = preparer.prepare([(data, None)])
        except InvalidInput:
            return
        assert rows[0].shape == (3, 224, 224), rows[0].shape

    return one


def text_target(bundle_dir: Path):
    """One fuzz input (labels, then a template, one per line) -> the gateway's checks and the tokenizer."""
    from engines.runtime.bundle import load_bundle
    from engines.runtime.text import TextTokenizer
    from services.domain import InvalidInput
    from services.plumbing.limits import check_texts
    from services.plumbing.settings import Settings
    from services.gateway.labels import apply_template
    from services.gateway.questions import check_template

    bundle = load_bundle(bundle_dir)
    tokenizer = TextTokenizer(bundle.path, bundle.manifest.text)
    settings = Settings()

    def one(data: bytes) -> None:
        text = data.decode("utf-8", errors="replace")
        parts = text.split("\n")
        try:
            labels = check_texts(parts[:-1] or [text], settings, what="label")
            template = check_template(parts[-1] if len(parts) > 1 else "", labels, settings.max_text_chars)
        except InvalidInput:
            return
        ids = tokenizer.ids([apply_template(template, label) for label in labels])  # [N, L]
        assert ids.shape[0] == len(labels) and ids.shape[1] <= bundle.manifest.text.context_length

    return one


def request_target():
    """One fuzz input as ClassifyRequest bytes -> every check the gateway makes before the encoders
    (the servicer's conversion, then the gateway's own pure check of the question)."""
    from google.protobuf.message import DecodeError

    from medvlm.v1 import gateway_pb2
    from services.domain import InvalidInput
    from services.gateway.questions import check_question
    from services.gateway.servicer import image_of, question_of
    from services.plumbing.settings import Settings

    settings = Settings()

    def one(data: bytes) -> None:
        try:
            request = gateway_pb2.ClassifyRequest.FromString(data)
        except DecodeError:
            return
        question = question_of(request)
        try:
            images, asked = check_question(image_of(request), question, settings)
        except InvalidInput:
            return
        assert len(images) == 1
        if asked is None:
            assert question.label_set and not question.labels and not question.template
        else:
            assert [label.name for label in asked.labels] == list(question.labels)
            assert len(asked.templates) == 1 and asked.templates[0].count("{}") == 1

    return one


def run_target(target: str, seconds: float, runs: int, out: Path) -> None:
    """Fuzz one target in this process (libFuzzer takes over argv and exits when done)."""
    import atheris

    with atheris.instrument_imports(include=["medvlm.imaging", "services", "engines", "PIL", "pydicom"]):
        if target == "text":
            from devtools.launch import ensure_bundle

            one = text_target(ensure_bundle(ROOT / "bundles", "demo"))
        else:
            one = {"image": image_target, "request": request_target}[target]()
    corpus = out / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(_seeds(target)):
        (corpus / f"seed-{i}").write_bytes(seed)
    args = [sys.argv[0], str(corpus), f"-max_total_time={int(seconds)}", f"-runs={runs}",
            f"-artifact_prefix={out}/crash-{target}-", "-max_len=65536", "-print_final_stats=1"]
    atheris.Setup(args, one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="total time, split between the targets")
    parser.add_argument("--target", choices=TARGETS, help="fuzz one target in this process")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=-1, help="stop after this many inputs (-1: time only)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.target:
        run_target(args.target, args.seconds, args.runs, args.out)
        return 0
    seconds = max(10.0, args.minutes * 60 / len(TARGETS))
    results = {}
    for target in TARGETS:
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "bench.fuzz", "--target", target, "--seconds", str(seconds),
                               "--out", str(args.out)], cwd=ROOT, capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        (args.out / f"{target}.log").write_text(log)
        done = re.findall(r"Done (\d+) runs in (\d+) second", log)
        crashes = sorted(p.name for p in args.out.glob(f"crash-{target}-*"))
        results[target] = {"runs": int(done[-1][0]) if done else None, "seconds": round(time.monotonic() - started, 1),
                           "exit_code": proc.returncode, "findings": crashes}
        print(f"{target}: {results[target]}", flush=True)
    (args.out / "fuzz.json").write_text(json.dumps(results, indent=1))
    ok = all(r["exit_code"] == 0 and not r["findings"] and (r["runs"] or 0) >= MIN_RUNS for r in results.values())
    print("fuzz: " + ("PASS" if ok else f"FAIL (each target needs >= {MIN_RUNS} inputs and no finding)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
