"""The shapes image dataset and the check that an image shows what its caption asks."""

import pytest
import torch

from mlatlas.data import DATASETS, load_dataset
from mlatlas.data.shapes import COLOURS, SHAPES, captioned_shapes
from mlatlas.eval.classifier import accuracy, classifier_info, load_feature_net
from mlatlas.eval.samples import score_samples
from mlatlas.eval.shapes import caption_agreement, colour_of, parse_caption, shape_of


@pytest.fixture(scope="module")
def shapes():
    return load_dataset("shapes")


def test_dataset_sizes_range_and_labels_match_captions(shapes):
    assert "shapes" in DATASETS and "shapes-binary" not in DATASETS
    assert shapes.kind == "image" and shapes.classes == SHAPES and shapes.num_classes == 4
    assert shapes.x_train.shape == (6000, 3, 32, 32) and shapes.x_test.shape == (1000, 3, 32, 32)
    assert shapes.x_train.dtype == torch.float32
    assert shapes.x_train.min() >= 0 and shapes.x_train.max() <= 1
    assert len(shapes.captions_train) == 6000 and len(shapes.captions_test) == 1000
    for x, y, captions in ((shapes.x_train, shapes.y_train, shapes.captions_train),
                           (shapes.x_test, shapes.y_test, shapes.captions_test)):
        parsed = torch.tensor([parse_caption(c) for c in captions])
        assert torch.equal(parsed[:, 0], y)
        assert torch.equal(parsed[:, 1], colour_of(x))
    assert set(shapes.y_train.tolist()) == set(range(4))
    assert load_dataset("shapes") is shapes  # cached like the other named sets
    assert load_dataset("digits").captions_train is None


def test_colour_of_is_exact_on_every_test_image():
    data = captioned_shapes(1000, seed=0, split="test")
    assert torch.equal(colour_of(data.images), data.attributes["colour"])
    zero_shot = captioned_shapes(300, split="zero-shot")
    assert torch.equal(colour_of(zero_shot.images), zero_shot.attributes["colour"])


def test_colour_of_background_only_and_noise():
    blank = torch.full((2, 3, 32, 32), 0.08)
    assert colour_of(blank).tolist() == [-1, -1]
    data = captioned_shapes(200, seed=4, split="test")
    noisy = (data.images + 0.05 * torch.randn(data.images.shape,
                                              generator=torch.Generator().manual_seed(0)))
    assert (colour_of(noisy.clamp(0, 1)) == data.attributes["colour"]).double().mean() > 0.97


def test_shipped_net_reads_shapes_including_held_out_pairs(shapes):
    info = classifier_info("shapes")
    net = load_feature_net("shapes")
    assert accuracy(net, shapes.x_test, shapes.y_test) == pytest.approx(
        float(info["test_accuracy"]), abs=1e-6)
    assert "test_accuracy_binary" not in info
    test = captioned_shapes(500, seed=7, split="test")
    assert (shape_of(test.images) == test.attributes["shape"]).double().mean() >= 0.97
    zero_shot = captioned_shapes(500, seed=7, split="zero-shot")
    assert (shape_of(zero_shot.images) == zero_shot.attributes["shape"]).double().mean() >= 0.9


def test_caption_agreement_is_one_for_own_attributes_and_chance_when_shuffled():
    data = captioned_shapes(400, seed=2, split="test")
    shape, colour = data.attributes["shape"], data.attributes["colour"]
    own = caption_agreement(data.images, shape, colour)
    assert own["n"] == 400
    assert own["colour_accuracy"] == 1.0 and own["shape_accuracy"] >= 0.97
    assert own["both_accuracy"] >= 0.97
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    shuffled = caption_agreement(data.images, shape[perm], colour[perm])
    # Chance under shuffling is sum_k p_k^2 over the attribute's frequencies p_k.
    for name, asked in (("shape", shape), ("colour", colour)):
        p = torch.bincount(asked).double() / len(asked)
        assert abs(shuffled[f"{name}_accuracy"] - float(p.square().sum())) < 0.1
    assert shuffled["both_accuracy"] < 0.2
    one = caption_agreement(data.images[:5], 0, 0)  # one asked attribute for every image
    assert one["n"] == 5


def test_parse_caption_round_trips_generated_captions():
    data = captioned_shapes(300, seed=9)
    for text, shape, colour in zip(data.captions, data.attributes["shape"],
                                   data.attributes["colour"], strict=True):
        assert parse_caption(text) == (int(shape), int(colour))
    assert parse_caption("Three GREEN crosses!") == (SHAPES.index("cross"),
                                                     list(COLOURS).index("green"))


@pytest.mark.parametrize("text, match", [
    ("a red hexagon", "names no shape"), ("a big circle", "names no colour"),
    ("a red and blue circle", "names 2 colours"), ("a red circle and a square", "2 shapes"),
])
def test_parse_caption_rejects_unknown_captions(text, match):
    with pytest.raises(ValueError, match=match) as err:
        parse_caption(text)
    assert repr(text) in str(err.value)


def test_bad_inputs_raise():
    for bad in (torch.rand(2, 1, 32, 32), torch.rand(3, 32, 32), torch.rand(2, 3, 28, 28),
                torch.rand(0, 3, 32, 32)):
        for check in (colour_of, shape_of):
            with pytest.raises(ValueError, match="images"):
                check(bad)
    images = torch.rand(4, 3, 32, 32)
    with pytest.raises(ValueError, match="shape must be one index or 4"):
        caption_agreement(images, torch.zeros(3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"colour indices must lie in \[0, 5\]"):
        caption_agreement(images, 0, 6)
    with pytest.raises(ValueError, match="integer"):
        caption_agreement(images, 0.5, 0)
    with pytest.raises(ValueError, match="a string"):
        parse_caption(3)


def test_score_samples_gives_frechet_and_precision_recall(shapes):
    metrics = score_samples(shapes.x_train[:200], shapes)
    assert {"frechet_distance", "precision", "recall"} <= set(metrics)
    assert metrics["precision"] > 0.5 and metrics["recall"] > 0.5
    blank = score_samples(torch.full((200, 3, 32, 32), 0.08), shapes)
    assert blank["frechet_distance"] > 5 * metrics["frechet_distance"]
