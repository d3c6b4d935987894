"""The synthetic generator: deterministic from a seed, every class covered, varied images and captions."""

from __future__ import annotations

import numpy as np
from PIL import Image

from engines.build import demo_eval, synthetic


def test_classes_span_three_modalities_and_twelve_findings():
    modalities = {f.modality for f in synthetic.FINDINGS}
    assert len(modalities) >= 3
    assert synthetic.NUM_CLASSES >= 12
    assert len(set(synthetic.CLASS_LABELS)) == synthetic.NUM_CLASSES  # plain prompts are unambiguous
    assert len(set(synthetic.CLASS_KEYS)) == synthetic.NUM_CLASSES


def test_same_seed_gives_identical_samples():
    for index in (0, 5, 13, 27):
        a, b = synthetic.sample(3, index), synthetic.sample(3, index)
        assert np.array_equal(a.image, b.image)
        assert (a.label, a.caption) == (b.label, b.caption)


def test_other_seed_gives_other_images():
    assert not np.array_equal(synthetic.sample(3, 0).image, synthetic.sample(4, 0).image)


def test_generate_covers_every_class_in_order():
    images, labels = synthetic.generate(seed=5, count=synthetic.NUM_CLASSES)
    assert images.shape == (synthetic.NUM_CLASSES, synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE, 3)
    assert images.dtype == np.uint8
    assert labels.tolist() == list(range(synthetic.NUM_CLASSES))
    for label, image in zip(labels, images):
        assert np.array_equal(image, synthetic.sample(5, int(label)).image)


def test_write_npy_matches_generate(tmp_path):
    images, _ = synthetic.generate(seed=5, count=6)
    path = synthetic.write_npy(5, 6, tmp_path / "images.npy")
    assert np.array_equal(np.load(path), images)


def test_images_of_one_class_vary():
    k = synthetic.NUM_CLASSES
    for label in range(k):
        a, b = (synthetic.sample(9, label + j * k).image.astype(np.float32) for j in range(2))
        assert a.std() > 10, synthetic.CLASS_KEYS[label]  # not blank
        assert np.abs(a - b).mean() > 5, synthetic.CLASS_KEYS[label]  # not the same picture twice


def test_captions_belong_to_their_class_and_vary():
    rng = np.random.default_rng(0)
    for label in range(synthetic.NUM_CLASSES):
        allowed = set(synthetic.class_captions(label))
        drawn = {synthetic.caption(label, rng) for _ in range(40)}
        assert drawn <= allowed
        assert len(drawn) > 10
        assert synthetic.CLASS_LABELS[label] in allowed


def test_held_out_template_is_not_a_training_caption():
    captions = set(synthetic.all_captions())
    for label in synthetic.CLASS_LABELS:
        assert demo_eval.CHANGED_TEMPLATE.format(label) not in captions


def test_write_samples_names_the_ground_truth(tmp_path):
    paths = synthetic.write_samples(tmp_path, seed=7, per_class=1)
    assert sorted(p.stem for p in paths) == sorted(synthetic.CLASS_KEYS)
    with Image.open(paths[0]) as im:
        assert im.size == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)
