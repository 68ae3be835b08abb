"""The captioned-shapes dataset: deterministic, held-out combinations, faithful captions."""

import pytest
import torch

from mlatlas.data.shapes import COLOURS, SHAPES, captioned_shapes, held_out_pairs


def test_same_seed_same_data_and_splits_differ():
    a, b = captioned_shapes(50, seed=3), captioned_shapes(50, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    test = captioned_shapes(50, seed=3, split="test")
    assert not torch.equal(a.images, test.images)
    assert a.images.shape == (50, 3, 32, 32)
    assert a.images.min() >= 0 and a.images.max() <= 1


def test_held_out_combinations_appear_only_in_the_zero_shot_split():
    held = held_out_pairs(0)
    assert 0 < len(held) < len(COLOURS) * len(SHAPES)
    for split in ("train", "test", "zero-shot"):
        data = captioned_shapes(400, split=split)
        pairs = set(zip(data.attributes["colour"].tolist(), data.attributes["shape"].tolist(),
                        strict=True))
        assert pairs <= held if split == "zero-shot" else not pairs & held
    train = captioned_shapes(2000)
    # Each colour and each shape of a held-out pair is still seen in training.
    assert set(train.attributes["colour"].tolist()) == set(range(len(COLOURS)))
    assert set(train.attributes["shape"].tolist()) == set(range(len(SHAPES)))


def test_captions_name_the_drawn_attributes_and_pixels_have_the_colour():
    data = captioned_shapes(200, seed=1)
    colours = torch.tensor(list(COLOURS.values()))
    for i, text in enumerate(data.captions):
        colour, shape = data.attributes["colour"][i], data.attributes["shape"][i]
        assert list(COLOURS)[colour] in text and SHAPES[shape] in text
        assert ("on the left" in text) == (data.attributes["count"][i] == 1
                                            and bool(data.attributes["left"][i]))
        pixels = data.images[i].reshape(3, -1).T
        drawn = pixels[(pixels - 0.08).abs().sum(1) > 1e-6]
        assert len(drawn) > 0 and torch.allclose(drawn, colours[colour].expand_as(drawn))


def test_corruption_swaps_the_chosen_share_of_captions():
    clean = captioned_shapes(600, seed=2)
    noisy = captioned_shapes(600, seed=2, corrupt=1 / 3)
    share = noisy.corrupted.float().mean().item()
    assert share == pytest.approx(1 / 3, abs=0.05)
    assert torch.equal(clean.images, noisy.images)
    kept = [i for i in range(600) if not noisy.corrupted[i]]
    assert all(noisy.captions[i] == clean.captions[i] for i in kept)
    changed = sum(noisy.captions[i] != clean.captions[i] for i in range(600)
                  if noisy.corrupted[i])
    assert changed > 0.9 * noisy.corrupted.sum().item()


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        captioned_shapes(4, split="val")
    with pytest.raises(ValueError, match="corrupt"):
        captioned_shapes(4, corrupt=1.5)
