"""Bundle build: manifest, ONNX graphs vs golden data, tokenizer agreement, parity gate, offline errors."""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engines.build import bundle, localdir, registry  # noqa: E402
from engines.runtime import manifest as mf  # noqa: E402
from engines.runtime.text import TextTokenizer  # noqa: E402

AWKWARD_TEXTS = [
    "",
    "   ",
    "chest x-ray",
    "  Chest\tX-ray \n\n shows   right  lower lobe\u00a0pneumonia  ",
    "MRI brain; T2/FLAIR: no acute infarct (see prior, 2019-03-04)!?...",
    "café-au-lait macule, naïve, Ödem, µg/kg, 5 × 3 cm, ≥ 2 mm — ✓ 肺炎 🫁",
    "[CLS] [SEP] [PAD] [MASK] [UNK] ## ##ing",
    "“quoted” don’t x &lt; 5 mm &amp;amp; &#39;a&#39; ﬁbrosis ＣＴ scan CafÃ© \u200b\x07",
    "UPPER lower MiXeD",
    "pneumonia " * 200,
    "x" * 300,
]


@pytest.fixture(scope="module")
def golden(tiny_bundle: Path) -> dict[str, np.ndarray]:
    with np.load(tiny_bundle / bundle.GOLDEN_FILE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def open_clip_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """open_clip's tokenizer of the tiny model, as `open_clip.get_tokenizer("local-dir:...")` builds it."""
    return registry.get_source("tiny").load(tmp_path_factory.mktemp("tiny-src"), None).tokenizer


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_layout_and_hashes(tiny_bundle: Path) -> None:
    path = tiny_bundle
    manifest = mf.Manifest.read(path)
    assert path.name == "tiny-1" and manifest.bundle_id.startswith("tiny-1+")
    assert (manifest.kind, manifest.embed_dim, manifest.opset) == (mf.KIND_TEST, 64, 18)
    image = manifest.image
    assert (image.size, image.interpolation, image.resize_mode) == (224, "bicubic", "shortest")
    assert (manifest.text.context_length, manifest.text.pad_id) == (32, 0)
    assert manifest.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {mf.MANIFEST_NAME}
    assert set(manifest.files) == on_disk
    for name, entry in manifest.files.items():
        assert entry.sha256 == mf.sha256_file(path / name), name
    assert manifest.file_for("vision") == "vision.onnx" and manifest.precision_of("vision") == "fp32"
    assert manifest.file_for("text") == "text.onnx" and manifest.precision_of("text") == "fp32"
    assert "tokenizer/tokenizer.json" in manifest.files
    assert manifest.files["golden.npz"].role == "golden"
    assert all(c["min_cosine"] >= bundle.FP32_MIN_COSINE for c in manifest.build["parity"]["cases"])
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"
    assert sum(p.stat().st_size for p in path.rglob("*")) < 20e6


def test_graph_signatures(tiny_bundle: Path) -> None:
    path = tiny_bundle
    for name, inp, out, dynamic in (
        ("vision.onnx", mf.VISION_INPUT, mf.VISION_OUTPUT, ["batch"]),
        ("text.onnx", mf.TEXT_INPUT, mf.TEXT_OUTPUT, ["batch", "seq"]),
    ):
        model = onnx.load(str(path / name))
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        session = _session(path / name)
        (i,), (o,) = session.get_inputs(), session.get_outputs()
        assert (i.name, o.name) == (inp, out)
        assert [d for d in i.shape if isinstance(d, str)] == dynamic
        assert o.shape == ["batch", 64]


def test_engine_files_name_no_path_of_the_build(tiny_bundle: Path) -> None:
    """The exporter's stack traces named the checkout's and the environment's files: the same
    weights built in another folder gave other bytes (another bundle id) and the files carried
    the build machine's paths."""
    root = str(Path(__file__).resolve().parent.parent)
    for name in ("vision.onnx", "text.onnx"):
        data = (tiny_bundle / name).read_bytes()
        assert root.encode() not in data and b"site-packages" not in data
        model = onnx.load(str(tiny_bundle / name))
        keys = {p.key for node in model.graph.node for p in node.metadata_props}
        assert "pkg.torch.onnx.stack_trace" not in keys and "pkg.torch.onnx.name_scopes" in keys


def test_golden_contents(golden: dict[str, np.ndarray]) -> None:
    assert set(golden) == set(mf.GOLDEN_KEYS)
    images, ids = golden[mf.VISION_INPUT], golden[mf.TEXT_INPUT]
    assert images.dtype == np.float32 and images.shape == (5, 3, 224, 224)
    assert ids.dtype == np.int64 and ids.shape == (len(bundle.GOLDEN_TEXTS), 32)
    assert golden[mf.VISION_OUTPUT].shape == (5, 64) and golden[mf.TEXT_OUTPUT].shape == (5, 64)
    assert len({im.tobytes() for im in images}) == len(images)
    assert (ids[:, 0] == ids[0, 0]).all()  # [CLS] first
    assert ids[-1, -1] != 0 and (ids[:, -1] == 0).any()  # the long text fills the context, others are padded


def test_onnx_reproduces_golden(tiny_bundle: Path, golden: dict[str, np.ndarray]) -> None:
    path = tiny_bundle
    vision, text = _session(path / "vision.onnx"), _session(path / "text.onnx")
    images, ids = golden[mf.VISION_INPUT], golden[mf.TEXT_INPUT]
    for n in (1, 2, len(images)):
        out = vision.run(None, {mf.VISION_INPUT: images[:n]})[0]
        bundle.check_parity(f"vision n={n}", golden[mf.VISION_OUTPUT][:n], out)
    for n in (1, 3, len(ids)):
        out = text.run(None, {mf.TEXT_INPUT: ids[:n]})[0]
        bundle.check_parity(f"text n={n}", golden[mf.TEXT_OUTPUT][:n], out)
    short = ids[[0, 2]]
    length = bundle.trimmed_length(short, pad_id=0)
    assert length < ids.shape[1]
    trimmed = text.run(None, {mf.TEXT_INPUT: short[:, :length]})[0]
    bundle.check_parity("text trimmed", golden[mf.TEXT_OUTPUT][[0, 2]], trimmed)


def test_tokenizer_matches_open_clip(tiny_bundle: Path, open_clip_tokenizer) -> None:
    manifest = mf.Manifest.read(tiny_bundle)
    reference = open_clip_tokenizer(AWKWARD_TEXTS).numpy()
    tokenizer = TextTokenizer(tiny_bundle, manifest.text)
    ids = tokenizer.ids(AWKWARD_TEXTS, pad_to=manifest.text.context_length)
    np.testing.assert_array_equal(ids, reference)
    trimmed = tokenizer.ids(AWKWARD_TEXTS)  # padded to the longest row only, as the service sends them
    np.testing.assert_array_equal(trimmed, reference[:, : trimmed.shape[1]])
    assert ids[-2, -1] != manifest.text.pad_id  # the long text was truncated, ending in [SEP]
    # One 300-character word: [CLS] [UNK] [SEP].
    assert (ids[-1, :3] != manifest.text.pad_id).all() and ids[-1, 3] == manifest.text.pad_id
    assert (ids[0, 2:] == manifest.text.pad_id).all()  # empty text: [CLS] [SEP] then padding


def test_check_parity_accepts_equal_and_refuses_perturbed(golden: dict[str, np.ndarray]) -> None:
    ref = golden[mf.VISION_OUTPUT]
    assert bundle.check_parity("same", ref, ref.copy()).min_cosine == pytest.approx(1.0)
    noisy = ref + np.random.default_rng(0).normal(scale=0.01 * np.abs(ref).max(), size=ref.shape)
    with pytest.raises(bundle.ParityError, match="min cosine"):
        bundle.check_parity("noise", ref, noisy.astype(np.float32))
    with pytest.raises(bundle.ParityError):  # same direction, cosine 1, but 1 % larger
        bundle.check_parity("scaled", ref, ref * 1.01)
    one_row = ref.copy()
    one_row[3] = -one_row[3]
    with pytest.raises(bundle.ParityError):
        bundle.check_parity("one row", ref, one_row)
    with pytest.raises(bundle.ParityError, match="non-finite"):
        bundle.check_parity("nan", ref, np.where(ref > 0, np.nan, ref))
    with pytest.raises(bundle.ParityError, match="shape"):
        bundle.check_parity("shape", ref, ref[:2])


def _perturbed_vision(src: Path, dst: Path) -> Path:
    """A copy of vision.onnx with its output projection nudged by 0.5 % noise."""
    model = onnx.load(str(src))
    init = next(t for t in model.graph.initializer if t.name.endswith("visual.head.proj.weight"))
    weight = onnx.numpy_helper.to_array(init)
    noise = np.random.default_rng(1).normal(scale=0.005 * np.abs(weight).max(), size=weight.shape)
    init.CopyFrom(onnx.numpy_helper.from_array((weight + noise).astype(np.float32), init.name))
    onnx.save(model, str(dst))
    return dst


def test_run_parity_refuses_perturbed_graph(tiny_bundle: Path, golden: dict[str, np.ndarray],
                                            tmp_path: Path) -> None:
    path = tiny_bundle
    assert len(bundle.run_parity(path / "vision.onnx", path / "text.onnx", golden, pad_id=0)) == 5
    bad = _perturbed_vision(path / "vision.onnx", tmp_path / "vision.onnx")
    with pytest.raises(bundle.ParityError, match="vision"):
        bundle.run_parity(bad, path / "text.onnx", golden, pad_id=0)


def test_failed_parity_writes_no_bundle(tiny_bundle: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_bundle
    bad = _perturbed_vision(path / "vision.onnx", tmp_path / "bad-vision.onnx")
    monkeypatch.setattr(bundle.export, "export_vision", lambda model, dst, **kw: shutil.copyfile(bad, dst))
    good = path / "text.onnx"
    monkeypatch.setattr(bundle.export, "export_text", lambda model, dst, **kw: shutil.copyfile(good, dst))
    out = tmp_path / "bundles"
    with pytest.raises(bundle.ParityError, match="vision"):
        bundle.build_bundle("tiny", out)
    assert list(out.iterdir()) == []


def test_existing_bundle_is_not_overwritten(tiny_bundle: Path) -> None:
    path = tiny_bundle
    before = mf.Manifest.read(path).content_hash
    with pytest.raises(bundle.BundleError, match="--force"):
        bundle.build_bundle("tiny", path.parent)
    assert mf.Manifest.read(path).content_hash == before


def test_unknown_model_and_stray_weights() -> None:
    with pytest.raises(registry.SourceError, match="known models: tiny"):
        bundle.build_bundle("nope", Path("unused"))
    with pytest.raises(bundle.BundleError, match="no weights"):
        bundle.build_bundle("tiny", Path("unused"), weights=Path("somewhere"))


def test_biomedclip_offline_says_how_to_supply_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(registry.BIOMEDCLIP_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(registry.SourceError) as info:
        bundle.build_bundle("biomedclip", tmp_path / "bundles")
    message = str(info.value)
    assert f"hf download {registry.BIOMEDCLIP_HUB_ID} --local-dir DIR" in message
    assert "make bundle MODEL=biomedclip WEIGHTS=DIR" in message
    assert registry.BIOMEDCLIP_DIR_ENV in message
    assert list((tmp_path / "bundles").iterdir()) == []


def test_biomedclip_weights_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "snapshot").mkdir()
    with pytest.raises(registry.SourceError, match="lacks open_clip_config.json or a checkpoint"):
        bundle.build_bundle("biomedclip", tmp_path / "bundles", weights=tmp_path / "snapshot")


def test_demo_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def import_module(name: str, *args):
        if name == "engines.build.demo":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args)

    monkeypatch.setattr(registry.importlib, "import_module", import_module)
    with pytest.raises(registry.SourceError, match="demo.py is missing"):
        bundle.build_bundle("demo", tmp_path)
    assert "demo" in registry.names()


def test_vocab_is_deterministic(tmp_path: Path) -> None:
    a = localdir.build_wordpiece_vocab(registry.TINY_CORPUS, tmp_path / "a.txt", vocab_size=300)
    reordered = list(reversed(registry.TINY_CORPUS))
    b = localdir.build_wordpiece_vocab(reordered, tmp_path / "b.txt", vocab_size=300)
    lines = a.read_text().splitlines()
    assert lines[:5] == list(localdir.SPECIAL_TOKENS) and len(lines) == 300 == len(set(lines))
    assert a.read_bytes() == b.read_bytes()


def test_biomedclip_loads_a_local_snapshot(tmp_path: Path) -> None:
    """A snapshot laid out like the hub repository (config naming the PubMedBERT repo, .bin weights) loads."""
    import json

    import torch

    source = registry.get_source("tiny")
    reference = source.load(tmp_path / "src", None)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    config = json.loads((tmp_path / "src" / "tiny" / localdir.CONFIG_NAME).read_text())
    hub_bert = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    config["model_cfg"]["text_cfg"].update(hf_model_name=hub_bert, hf_tokenizer_name=hub_bert)
    (snapshot / localdir.CONFIG_NAME).write_text(json.dumps(config))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tmp_path / "src" / "tiny" / name, snapshot / name)
    torch.save(reference.model.state_dict(), snapshot / "open_clip_pytorch_model.bin")

    loaded = registry.get_source("biomedclip").load(tmp_path / "work", snapshot)
    assert loaded.origin == "local snapshot snapshot/open_clip_pytorch_model.bin"
    images = torch.linspace(-2, 2, 2 * 3 * 224 * 224).reshape(2, 3, 224, 224)  # [2, 3, 224, 224]
    ids = reference.tokenizer(["chest x-ray", "brain mri"])  # [2, 32]
    np.testing.assert_array_equal(loaded.tokenizer(["chest x-ray", "brain mri"]), ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(images), reference.model.encode_image(images))
        torch.testing.assert_close(loaded.model.encode_text(ids), reference.model.encode_text(ids))


# Every way the build command is invoked (Makefile, docs, README, k8s plans Job, launcher, bench)
# and the step it must run.
BUILD_COMMAND_LINES = [
    ("--model demo --out bundles", "_build"),
    ("--model biomedclip --out bundles --weights w --precision int8,fp16 --calibration c --force", "_build"),
    ("--model demo --out bundles --sign-key release.key", "_build"),
    ("quantize --bundle b --precision int8 --calibration c", "_quantize"),
    ("quantize --bundle b --schemes dynamic", "_quantize"),
    ("openvino --bundle b --calibration c", "_openvino"),
    ("calibrate --bundle b --calibration c", "_calibrate"),
    ("plans --bundle b", "_plans"),
    ("plans --bundle b --precision fp32,fp16", "_plans"),
    ("sign --bundle b --key release.key", "_sign"),
]


@pytest.mark.parametrize(("line", "step"), BUILD_COMMAND_LINES)
def test_build_command_lines_parse_to_their_step(line: str, step: str) -> None:
    from engines.build.__main__ import _parser

    args = _parser().parse_args(line.split())
    assert args.run.__name__ == step
    if step == "_quantize":
        assert args.precision == ["int8"]  # given, or quantize's default
    if step == "_build" and "--precision" not in line:
        assert args.precision == []  # a plain build adds no reduced precision


def test_build_without_a_model_or_command_is_refused(capsys) -> None:
    from engines.build.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", "bundles"])
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err
