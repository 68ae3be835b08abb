"""The generated VQA sets: answers recomputed from the pixels, splits, sizes, the MMBench TSV."""

import re

import numpy as np
import pytest
import torch

from mlatlas.data import load_dataset
from mlatlas.data import vqa as V
from mlatlas.data.shapes import COLOURS, SHAPES
from mlatlas.eval import circular

scipy_ndimage = pytest.importorskip("scipy.ndimage")

RGB = np.array(list(COLOURS.values()))
NAMES = list(COLOURS)


@pytest.fixture(scope="module")
def sets():
    return {split: V.vqa_set(360, seed=0, split=split) for split in V.SPLITS}


# --- an independent reading of the pixels ----------------------------------------------------

def shape_of(mask: np.ndarray) -> str:
    """Which shape a component's (h, w) bool mask (cropped to its box) is, from its row widths:
    a square fills its box, a triangle widens down to its widest row at the bottom, a cross is
    narrow on most rows (all but its bar's), a circle on few."""
    h, w = mask.shape
    rows = mask.sum(1)
    if mask.mean() > 0.97:
        return "square"
    if rows[-1] == rows.max() and rows[0] <= rows[-1] / 2:
        return "triangle"
    return "cross" if (rows < 0.6 * w).mean() > 0.45 else "circle"


def parse(image: torch.Tensor) -> list[tuple[str, str, tuple[float, float]]]:
    """(shape, colour, centroid (x, y)) of each 8-connected object, in label order."""
    pixels = image.permute(1, 2, 0).numpy()
    foreground = np.abs(pixels - V.BACKGROUND).max(-1) > 1e-6
    labels, k = scipy_ndimage.label(foreground, structure=np.ones((3, 3)))
    objects = []
    for i, box in enumerate(scipy_ndimage.find_objects(labels), start=1):
        mask = labels == i
        colour = NAMES[int(np.abs(RGB - pixels[mask].mean(0)).sum(1).argmin())]
        ys, xs = np.nonzero(mask)
        objects.append((shape_of(mask[box]), colour, (xs.mean() + 0.5, ys.mean() + 0.5)))
    assert len(objects) == k
    return objects


def relation_of(dx: float, dy: float) -> str:
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _items(vqa, category):
    return [i for i in range(len(vqa)) if vqa.categories[i] == category]


def _word(count: int, colour: str) -> str:
    if count == 1:
        return "an" if colour[0] in "aeiou" else "a"
    return {2: "two", 3: "three", 4: "four", 5: "five"}[count]


def _nouns(shape: str, count: int) -> str:
    return shape if count == 1 else shape + ("es" if shape == "cross" else "s")


# --- the answers from the pixels -------------------------------------------------------------

@pytest.mark.parametrize("split", V.SPLITS)
def test_count_colour_shape_answers_match_the_pixels(sets, split):
    vqa = sets[split]
    for category in ("count", "colour", "shape"):
        for i in _items(vqa, category):
            objects = parse(vqa.images[i])
            shapes, colours = {o[0] for o in objects}, {o[1] for o in objects}
            assert len(shapes) == len(colours) == 1, (i, objects)
            shape, colour = shapes.pop(), colours.pop()
            truth = {"count": str(len(objects)), "colour": colour, "shape": shape}[category]
            assert vqa.answers[i] == truth, (i, vqa.questions[i], objects)
            if category == "shape":
                assert len(objects) == 1
            else:
                assert re.search(rf"\b{shape}", vqa.questions[i])
            assert vqa.captions[i] == (f"{_word(len(objects), colour)} {colour} "
                                       f"{_nouns(shape, len(objects))}")


@pytest.mark.parametrize("split", V.SPLITS)
def test_position_answers_match_the_centroids(sets, split):
    vqa = sets[split]
    names = "|".join(NAMES)
    kinds = "|".join(SHAPES)
    for i in _items(vqa, "position"):
        (ca, sa), (cb, sb) = re.findall(rf"the ({names}) ({kinds})", vqa.questions[i])
        objects = parse(vqa.images[i])
        assert len(objects) == 2 and (ca, sa) != (cb, sb)
        by_name = {(colour, shape): xy for shape, colour, xy in objects}
        (xa, ya), (xb, yb) = by_name[(ca, sa)], by_name[(cb, sb)]
        assert vqa.answers[i] == relation_of(xa - xb, ya - yb), (i, vqa.questions[i])
        words = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
        assert vqa.captions[i] == (f"{_word(1, ca)} {ca} {sa} {words[vqa.answers[i]]} "
                                   f"{_word(1, cb)} {cb} {sb}")


@pytest.mark.parametrize("split", V.SPLITS)
def test_compare_answers_match_the_counts(sets, split):
    vqa = sets[split]
    kinds = "|".join(SHAPES)
    for i in _items(vqa, "compare"):
        asked = re.findall(rf"\b({kinds})(?:e?s)?\b", vqa.questions[i])
        objects = parse(vqa.images[i])
        counts = {s: sum(o[0] == s for o in objects) for s in asked}
        assert len(asked) == 2 and set(o[0] for o in objects) == set(asked), (i, objects)
        assert len(objects) <= V.MAX_COMPARE_TOTAL and len(set(counts.values())) == 2
        assert vqa.answers[i] == max(counts, key=counts.get), (i, vqa.questions[i], counts)


@pytest.mark.parametrize("split", V.SPLITS)
def test_ocr_strips_hold_the_answer_digits_of_the_split(sets, split):
    vqa = sets[split]
    pool, labels = V.digit_pool(split)
    for i in _items(vqa, "ocr"):
        image, a = vqa.images[i], vqa.attributes[i]
        digits, s, (x0, y0) = vqa.answers[i], a["scale"], a["origin"]
        assert re.fullmatch(r"\d{2,4}", digits) and a["digits"] == digits
        c = torch.tensor(COLOURS[a["colour"]])
        channel = int((c - V.BACKGROUND).abs().argmax())
        ink = (image[channel] - V.BACKGROUND) / (c[channel] - V.BACKGROUND)
        strip = ink[y0:y0 + 8 * s, x0:x0 + 8 * s * len(digits)]
        for j, (d, k) in enumerate(zip(digits, a["digit_ids"], strict=True)):
            glyph = strip[:, 8 * s * j:8 * s * (j + 1)][::s, ::s]
            torch.testing.assert_close(glyph, pool[k], atol=1e-5, rtol=0)
            assert int(labels[k]) == int(d)
        outside = ink.clone()
        outside[y0:y0 + 8 * s, x0:x0 + 8 * s * len(digits)] = 0
        assert outside.abs().max() < 1e-5
        assert vqa.captions[i] == f"the number {digits} in {a['colour']}"
        # Every option is one digit away from a common centre, so none stands out.
        options = vqa.options[i]
        assert all(len(o) == len(digits) for o in options)
        centres = [c for c in {o[:j] + d + o[j + 1:] for o in options for j in range(len(o))
                               for d in "0123456789"}
                   if all(sum(x != y for x, y in zip(c, o, strict=True)) == 1 for o in options)]
        assert centres, options


def test_ocr_options_do_not_give_the_answer_away():
    """The answer is an option like any other: the option sharing most digits with the others
    is the answer no more often than chance (1 / 4), which it was while distractors were the
    answer's own neighbours."""
    vqa = V.vqa_set(1200, seed=4, split="test", categories=("ocr",))
    picked = 0
    for options, answer in zip(vqa.options, vqa.answers, strict=True):
        shared = [sum(sum(x == y for x, y in zip(o, p, strict=True)) for p in options)
                  for o in options]
        picked += options[shared.index(max(shared))] == answer
    assert abs(picked / len(vqa) - 0.25) < 0.05, picked / len(vqa)


def test_ocr_digit_images_of_train_and_test_are_disjoint():
    train, _ = V.digit_pool("train")
    test, _ = V.digit_pool("test")
    unseen, _ = V.digit_pool("unseen")
    assert len(train) + len(test) == 1797 and torch.equal(test, unseen)
    same = (train.flatten(1)[:, None] == test.flatten(1)[None]).all(-1)
    assert not same.any()
    digits = load_dataset("digits")
    assert torch.equal(train, digits.x_train[:, 0])


# --- options, sizes, splits ------------------------------------------------------------------

@pytest.mark.parametrize("split", V.SPLITS)
def test_every_answer_is_among_its_options_at_answer_index(sets, split):
    vqa = sets[split]
    fields = (vqa.images, vqa.questions, vqa.answers, vqa.captions, vqa.categories,
              vqa.options, vqa.answer_index, vqa.attributes)
    assert all(len(f) == len(vqa) == 360 for f in fields)
    for options, answer, index in zip(vqa.options, vqa.answers, vqa.answer_index,
                                      strict=True):
        assert len(options) == V.N_OPTIONS == len(set(options))
        assert options[index] == answer
    # The answer's position is drawn at random: every label is used, none dominates.
    shares = np.bincount(vqa.answer_index, minlength=V.N_OPTIONS) / len(vqa)
    assert shares.min() > 0.15 and shares.max() < 0.35


def test_position_keeps_a_dominant_axis_and_the_objects_apart():
    vqa = V.vqa_set(300, seed=5, categories=["position", "count", "compare"],
                    sizes=[(24, 64), (64, 24), (32, 32)])
    for i, a in enumerate(vqa.attributes):
        centres = torch.tensor(a["centres"])
        h, w = vqa.images[i].shape[1:]
        assert ((centres >= a["radius"] + 0.5 - 1e-4)
                & (centres <= torch.tensor([w, h]) - a["radius"] - 0.5 + 1e-4)).all()
        dist = torch.cdist(centres, centres) + torch.eye(len(centres)) * 1e9
        assert dist.min() >= 2 * V.EXTENT * a["radius"] + V.GAP - 1e-4
        if vqa.categories[i] == "position":
            relation = torch.tensor(V.RELATIONS.index(vqa.answers[i]))
            assert V.relation_holds(relation, centres[0] - centres[1])


def test_images_have_the_sizes_of_their_split(sets):
    assert not set(V.TRAIN_SIZES) & set(V.UNSEEN_SIZES)
    for sizes in (V.TRAIN_SIZES, V.UNSEEN_SIZES):
        assert all(s % 8 == 0 and V.MIN_SIDE <= s <= V.MAX_SIDE for hw in sizes for s in hw)
    for split, sizes in (("train", V.TRAIN_SIZES), ("test", V.TRAIN_SIZES),
                         ("unseen", V.UNSEEN_SIZES)):
        seen = {tuple(im.shape[1:]) for im in sets[split].images}
        assert seen == set(sizes)
        assert all(im.shape[0] == 3 and im.dtype == torch.float32 and im.min() >= 0
                   and im.max() <= 1 for im in sets[split].images)
    small = V.vqa_set(24, sizes=[(24, 24)], split="unseen")
    assert all(im.shape == (3, 24, 24) for im in small.images)
    # A 24-wide strip holds at most 3 digits of 8 pixels.
    assert all(len(a) <= 3 for a, c in zip(small.answers, small.categories, strict=True)
               if c == "ocr")


def test_every_task_can_be_drawn_at_every_allowed_size():
    sides = range(V.MIN_SIDE, V.MAX_SIDE + 1, 8)
    sizes = [(h, w) for h in sides for w in sides]
    vqa = V.vqa_set(len(sizes) * len(V.CATEGORIES) * 2, seed=3, split="unseen", sizes=sizes)
    drawn = {(c, tuple(im.shape[1:])) for c, im in zip(vqa.categories, vqa.images,
                                                        strict=True)}
    assert len(drawn) > 0.8 * len(sizes) * len(V.CATEGORIES)
    for i in range(len(vqa)):
        if vqa.categories[i] != "ocr":
            assert len(parse(vqa.images[i])) == len(vqa.attributes[i]["shapes"]), i


def test_the_radius_does_not_tell_the_count():
    vqa = V.vqa_set(1200, seed=6, categories=["count"], sizes=[(32, 32)])
    radius = {c: [a["radius"] for a, n in zip(vqa.attributes, vqa.answers, strict=True)
                  if n == c] for c in "1234"}
    means = [np.mean(r) for r in radius.values()]
    assert max(means) - min(means) < 0.1


def test_deterministic_by_seed_and_splits_differ(sets):
    again = V.vqa_set(360, seed=0, split="train")
    base = sets["train"]
    assert all(torch.equal(a, b) for a, b in zip(base.images, again.images, strict=True))
    for name in ("questions", "answers", "captions", "categories", "options", "answer_index",
                 "attributes"):
        assert getattr(base, name) == getattr(again, name)
    other = V.vqa_set(360, seed=1, split="train")
    assert sum(torch.equal(a, b) for a, b in zip(base.images, other.images, strict=True)
               if a.shape == b.shape) < 5
    for first, second in (("train", "test"), ("train", "unseen"), ("test", "unseen")):
        keys = {(tuple(im.shape), im.numpy().tobytes()) for im in sets[first].images}
        assert not any((tuple(im.shape), im.numpy().tobytes()) in keys
                       for im in sets[second].images)


def test_categories_are_balanced_and_can_be_chosen():
    vqa = V.vqa_set(62, seed=2)
    counts = {c: vqa.categories.count(c) for c in V.CATEGORIES}
    assert counts == {"count": 11, "colour": 11, "shape": 10, "position": 10, "compare": 10,
                      "ocr": 10}
    # Shuffled, not in blocks.
    assert vqa.categories[:11] != ["count"] * 11
    two = V.vqa_set(9, categories=("ocr", "shape"))
    assert two.categories.count("ocr") == 5 and two.categories.count("shape") == 4


def test_subset_keeps_items_together(sets):
    vqa = sets["test"]
    part = vqa.subset([5, 0, 5])
    assert len(part) == 3 and part.questions == [vqa.questions[i] for i in (5, 0, 5)]
    assert part.images[1] is vqa.images[0] and part.attributes[0] == vqa.attributes[5]
    with pytest.raises(IndexError, match="out of range"):
        vqa.subset([360])


@pytest.mark.parametrize("kwargs, message", [
    ({"categories": ["color"]}, "unknown category 'color'; did you mean colour"),
    ({"categories": ["count", "count"]}, "must not repeat"),
    ({"categories": "count"}, "non-empty sequence"),
    ({"split": "tset"}, "unknown split 'tset'; did you mean test"),
    ({"sizes": [(30, 32)]}, "30x32: each side must be a multiple of 8 between 24 and 64"),
    ({"sizes": [(16, 32)]}, "16x32"),
    ({"sizes": [(32, 72)]}, "32x72"),
    ({"sizes": [32]}, r"an \(H, W\) pair"),
    ({"sizes": []}, "non-empty"),
    ({"n": 0}, "positive integer"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        V.vqa_set(**{"n": 12, **kwargs})


# --- images and the MMBench TSV --------------------------------------------------------------

def test_save_and_load_image_round_trip(tmp_path, sets):
    image = sets["unseen"].images[0]
    V.save_image(image, tmp_path / "a.png")
    back = V.load_image(tmp_path / "a.png")
    assert back.shape == image.shape
    assert (back - image).abs().max() <= 0.5 / 255 + 1e-6
    (tmp_path / "b.png").write_text("not a png")
    with pytest.raises(ValueError, match=r"b\.png: not a readable image"):
        V.load_image(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        V.save_image(image[0], tmp_path / "c.png")


def test_mmbench_tsv_round_trips_with_a_pass_per_option(tmp_path, sets):
    vqa = sets["test"].subset(range(48))
    path = tmp_path / "vqa.tsv"
    V.write_mmbench_tsv(vqa, path, start_index=7)
    rows = circular.read_tsv(path)
    assert [q.index for q in rows] == list(range(7, 55))
    for q, i in zip(rows, range(48), strict=True):
        assert q.question == vqa.questions[i] and q.options == vqa.options[i]
        assert q.options[circular.LABELS.index(q.answer)] == vqa.answers[i]
        assert q.category == vqa.categories[i]
        assert q.l2_category == V.L2_CATEGORIES[vqa.categories[i]]
        pixels = np.asarray(circular.decode_image(q.image).convert("RGB"))
        expected = (vqa.images[i].permute(1, 2, 0) * 255).round().numpy()
        assert np.array_equal(pixels, expected.astype(np.uint8))
    passes = circular.circular_passes(rows)
    assert len(passes) == V.N_OPTIONS * len(rows)
    for k in range(V.N_OPTIONS):  # pass k shows the options shifted by k, the same answer text
        q, p = rows[3], passes[3 * V.N_OPTIONS + k]
        assert p.g_index == q.index and p.options == q.options[k:] + q.options[:k]
        assert p.options[circular.LABELS.index(p.answer)] == vqa.answers[3]


def test_circular_eval_of_a_guesser_and_an_oracle(tmp_path):
    vqa = V.vqa_set(300, seed=4, split="test")
    path = tmp_path / "vqa.tsv"
    V.write_mmbench_tsv(vqa, path)
    rng = np.random.default_rng(0)

    def guess(image, question, options):
        return str(rng.choice(list(options)))

    chance = circular.evaluate(guess, path, progress=False)
    # (1/4)^4 = 1/256 under CircularEval: about one question of 300; 1/4 in the original order.
    assert chance.overall.questions == 300 and chance.overall.circular <= 0.02
    assert 0.17 < chance.overall.vanilla < 0.33
    assert set(chance.category) == set(V.CATEGORIES)

    def key(pixels: np.ndarray, question: str) -> tuple:
        return pixels.shape, pixels.tobytes(), question

    truth = {key((im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), q): a
             for im, q, a in zip(vqa.images, vqa.questions, vqa.answers, strict=True)}

    def oracle(image, question, options):
        return f"It is {truth[key(np.asarray(image.convert('RGB')), question)]}."

    perfect = circular.evaluate(oracle, path, progress=False)
    assert perfect.overall.circular == 1.0
    assert set(perfect.l2_category) == {"perception", "reasoning"}


def test_generation_is_vectorised_enough():
    import time
    start = time.perf_counter()
    V.vqa_set(3000, seed=9)
    assert time.perf_counter() - start < 5.0
