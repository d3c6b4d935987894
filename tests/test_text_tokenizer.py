"""The text service's tokenizer (`tokenizers` + the bundle's files) gives exactly open_clip's ids."""

from __future__ import annotations

import numpy as np

from engines.runtime.bundle import load_bundle
from engines.runtime.text import TextTokenizer

TEXTS = [
    "",
    "chest x-ray",
    "  Chest\tX-ray \n\n shows   right  lower lobe\u00a0pneumonia  ",
    "MRI brain; T2/FLAIR: no acute infarct (see prior, 2019-03-04)!?...",
    "café-au-lait macule, naïve, Ödem, µg/kg, 5 × 3 cm, ≥ 2 mm — ✓ 肺炎 🫁",
    "x &lt; 5 mm &amp;amp; &quot;quoted&quot;",  # HTML entities, doubly escaped
    "ﬁbrosis and ＣＴ scan",  # ligature and full-width letters (ftfy leaves these; NFC does not)
    "â€œmojibakeâ€\x9d repaired",  # ftfy repairs mis-decoded UTF-8
    "[CLS] [SEP] [PAD] [MASK] ## ##ing",
    "pneumonia " * 200,
]


def test_ids_equal_open_clip(tiny_bundle, tiny_reference):
    bundle = load_bundle(tiny_bundle)
    tokenizer = TextTokenizer(bundle.path, bundle.manifest.text)
    expected = tiny_reference.tokenizer(TEXTS).numpy()  # [N, context_length]
    full = tokenizer.ids(TEXTS, pad_to=bundle.manifest.text.context_length)
    np.testing.assert_array_equal(full, expected)
    trimmed = tokenizer.ids(TEXTS)  # padded to the longest text only
    assert trimmed.shape[1] == bundle.manifest.text.context_length  # the long text fills it
    short = tokenizer.ids(TEXTS[:3])
    assert short.shape[1] < bundle.manifest.text.context_length
    np.testing.assert_array_equal(short, expected[:3, : short.shape[1]])
    assert (expected[:3, short.shape[1]:] == bundle.manifest.text.pad_id).all()
