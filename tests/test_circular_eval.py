"""MMBench CircularEval: rotation, extraction, scoring and the harness (mlatlas.eval.circular).

Expected values are worked out by hand from VLMEvalKit's documented rule (``vlmutil circular``:
the labels rotated by collections.deque.rotate(1) per pass, option s moved to label c_map[s])
or are closed forms ((1/N)^N for a uniform guesser). benchmarks/circular_eval_vs_vlmevalkit.py
runs VLMEvalKit's own functions beside these; the slow test at the end runs it when
VLMEVALKIT_DIR names a checkout.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mlatlas.eval.circular import (
    LABELS,
    MMBenchError,
    Question,
    circular_offset,
    circular_passes,
    decode_image,
    evaluate,
    extract_answer,
    read_tsv,
    report,
    rotatable,
    rotate,
    score_passes,
    write_tsv,
)

ROOT = Path(__file__).resolve().parents[1]


def png_base64(colour: tuple[int, int, int], size: tuple[int, int] = (3, 2)) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def question(index: int, options: tuple[str, ...], answer: str, **fields) -> Question:
    return Question(index=index, g_index=index, question=f"q{index}", hint="",
                    options=options, answer=answer, **fields)


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- the rotation, by hand -------------------------------------------------------------------

def test_rotation_by_hand_two_options():
    # deque("AB").rotate(1) = BA: c_map A->B, B->A; option A's text moves to B.
    q = question(5, ("yes", "no"), "A")
    p1 = rotate(q, 1)
    assert (p1.index, p1.g_index, p1.options, p1.answer) == (1_000_005, 5, ("no", "yes"), "B")


def test_rotation_by_hand_three_options():
    # ABC -> CAB -> BCA: pass 1 maps A->C, B->A, C->B; pass 2 maps A->B, B->C, C->A.
    q = question(7, ("p", "q", "r"), "B")
    p1, p2 = rotate(q, 1), rotate(q, 2)
    assert (p1.options, p1.answer, p1.index) == (("q", "r", "p"), "A", 1_000_007)
    assert (p2.options, p2.answer, p2.index) == (("r", "p", "q"), "C", 2_000_007)
    assert rotate(q, 0) == q


def test_rotation_by_hand_four_options():
    # ABCD -> DABC -> CDAB -> BCDA; the answer D ("d") is shown at C, B, then A.
    q = question(0, ("a", "b", "c", "d"), "D")
    got = [(p.options, p.answer, p.index) for p in (rotate(q, k) for k in range(4))]
    assert got == [(("a", "b", "c", "d"), "D", 0), (("b", "c", "d", "a"), "C", 1_000_000),
                   (("c", "d", "a", "b"), "B", 2_000_000), (("d", "a", "b", "c"), "A", 3_000_000)]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 8), answer=st.integers(0, 7), index=st.integers(0, 999_999))
def test_every_pass_keeps_the_right_text_and_each_option_visits_each_label(n, answer, index):
    q = question(index, tuple(f"option {j}" for j in range(n)), LABELS[answer % n])
    passes = circular_passes([q])
    right = q.options[answer % n]
    assert [p.index for p in passes] == [index + k * 10**6 for k in range(n)]
    assert all(p.g_index == index for p in passes)
    assert all(p.options[LABELS.index(p.answer)] == right for p in passes)
    for j in range(n):  # a Latin square: option j sits at every label exactly once
        assert sorted(p.options.index(q.options[j]) for p in passes) == list(range(n))


def test_offset_grows_past_the_largest_index():
    assert circular_offset([0, 999_999]) == 10**6
    assert circular_offset([10**6]) == 10**7
    q = question(2_500_000, ("x", "y"), "A")
    assert [p.index for p in circular_passes([q], build=True)] == [2_500_000, 12_500_000]


@pytest.mark.parametrize("options", [("cat", "Both A and B", "dog"), ("E", "F"), ("only one",),
                                     ("A&C", "x", "y")])
def test_options_that_look_like_labels_are_asked_once(options):
    q = question(3, options, "A")
    assert not rotatable(q)
    assert circular_passes([q]) == [q]


def test_one_label_in_an_option_is_still_rotated():
    assert rotatable(question(3, ("Plan A", "Plan B and more", "none"), "A"))


def test_rotate_refuses_a_shift_outside_the_options():
    with pytest.raises(ValueError, match="shift k must be in 0..2"):
        rotate(question(1, ("a", "b", "c"), "A"), 3)


# --- extraction ------------------------------------------------------------------------------

OPTIONS = ("a cat", "a dog", "a red bird", "red")
REPLIES = [
    ("B", "B"), ("(B)", "B"), ("b", "B"), ("**C**.", "C"), (" D \n", "D"), ("[A]", "A"),
    ("Answer: C", "C"), ("answer: (D)", "D"), ("The answer is B.", "B"),
    ("The correct answer is (C) because the bird is red.", "C"),
    ("The answer is B, not option A.", "B"), ("I would pick option D.", "D"),
    ("Option A is a cat, option B a dog; the answer is B", "B"),
    ("B. a dog", "B"), ("(C) a red bird", "C"), ("C) a red bird", "C"),
    ("I'd go with B here.", "B"), ("A is correct.", "A"), ("A or C, hard to say.", "Z"),
    ("A dog.", "B"), ("It shows a cat sitting on a sofa.", "A"), ("It is red", "D"),
    ("It is a red bird", "C"), ("Sorry, I can't help with images of people yet.", "Z"),
    ("I cannot determine the answer from this image.", "Z"), ("Sorry, I see no dog.", "Z"),
    ("I'm not sure, but I think it's B.", "B"), ("nothing here", "Z"), ("", "Z"),
    ("E", "Z"), ("The answer is E.", "Z"), ("Either a cat or a dog.", "Z"),
]


@pytest.mark.parametrize(("reply", "expected"), REPLIES)
def test_extraction_of_free_form_replies(reply, expected):
    assert extract_answer(reply, OPTIONS) == expected


def test_extraction_only_offers_the_questions_labels():
    assert extract_answer("C", ("yes", "no")) == "Z"
    assert extract_answer("The answer is (C).", ("yes", "no", "maybe")) == "C"


# --- scoring ---------------------------------------------------------------------------------

def test_score_passes_by_hand():
    # group 4: both right; group 9: pass 0 right, pass 1 wrong; group 2: pass 0 wrong only.
    correct = np.array([True, True, True, False, False, True, True])
    groups = np.array([4, 4, 9, 9, 2, 2, 2])
    first = np.array([True, False, True, False, True, False, False])
    ids, circular, vanilla = score_passes(correct, groups, first)
    assert ids.tolist() == [2, 4, 9]
    assert circular.tolist() == [False, True, False]
    assert vanilla.tolist() == [False, True, True]


def test_score_passes_needs_one_first_pass_per_group():
    with pytest.raises(ValueError, match="group 1 has 2 first passes"):
        score_passes(np.array([True, True]), np.array([1, 1]), np.array([True, True]))
    with pytest.raises(ValueError, match="1-D of one length"):
        score_passes(np.array([True]), np.array([1, 2]), np.array([True, False]))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_a_uniform_guesser_scores_one_over_n_to_the_n(n):
    # 50 seeds x 5000 questions; each group's hit is Bernoulli(p), p = (1/N)^N, so the mean of
    # G groups has standard deviation sqrt(p (1 - p) / G): allow 4 of them (1 in 16,000 false
    # alarms). Vanilla is Bernoulli(1/N) likewise.
    seeds, questions = 50, 5000
    g = seeds * questions
    rng = np.random.default_rng(n)
    answers = rng.integers(0, n, (g, n))
    guesses = rng.integers(0, n, (g, n))
    groups = np.repeat(np.arange(g), n)
    first = np.tile(np.arange(n) == 0, g)
    _, circular, vanilla = score_passes((guesses == answers).ravel(), groups, first)
    for got, p in ((circular.mean(), (1 / n) ** n), (vanilla.mean(), 1 / n)):
        assert abs(got - p) < 4 * np.sqrt(p * (1 - p) / g), (got, p)
    if n == 4:
        assert abs(circular.mean() - 0.0039) < 0.0005


def test_report_per_category_and_l2_category_by_hand():
    qs = [question(0, ("x", "y"), "A", category="ocr", l2_category="perception"),
          question(1, ("x", "y"), "B", category="ocr", l2_category="perception"),
          question(2, ("x", "y", "z"), "C", category="counting", l2_category="perception"),
          question(3, ("x", "y"), "A", category="logic", l2_category="reasoning")]
    passes = circular_passes(qs)
    right = {0: "A", 1: "B", 2: "C", 3: "A"}  # every first pass right ...
    extracted = [p.answer if p.index == p.g_index or p.g_index in (0, 2) else right[p.g_index]
                 for p in passes]  # ... and every pass of questions 0 and 2
    rep = report(passes, extracted)
    assert (rep.overall.circular, rep.overall.vanilla, rep.overall.questions) == (0.5, 1.0, 4)
    assert rep.category["ocr"].circular == 0.5
    assert rep.category["counting"].circular == 1.0
    assert rep.category["logic"].circular == 0.0
    assert rep.l2_category["perception"].circular == pytest.approx(2 / 3)
    assert rep.l2_category["reasoning"].vanilla == 1.0
    assert [row[:2] for row in rep.rows()][:3] == [("overall", "Overall"),
                                                   ("l2-category", "perception"),
                                                   ("l2-category", "reasoning")]
    assert "Overall" in rep.format()


def test_report_needs_answers():
    with pytest.raises(MMBenchError, match="index 4 has no answer"):
        report([question(4, ("x", "y"), "")], ["A"])


# --- the TSV and the harness -----------------------------------------------------------------

def mmbench_tsv(path: Path, n: int, seed: int = 0) -> tuple[Path, list[Question]]:
    """n questions with 2-4 options (some cells left as pandas writes NaN) and an image each."""
    rng = np.random.default_rng(seed)
    qs = []
    for i in range(n):
        k = int(rng.integers(2, 5))
        qs.append(Question(index=i, g_index=i, question=f"What is shown in picture {i}?",
                           hint="Look closely." if i % 2 else "",
                           options=tuple(f"thing {i}.{j}" for j in range(k)),
                           answer=LABELS[int(rng.integers(k))],
                           category=("ocr", "counting")[i % 2],
                           l2_category="perception", image=png_base64((i % 256, 0, 0))))
    write_tsv(path, qs)
    return path, qs


def oracle_for(qs: list[Question]):
    right = {q.question: q.options[LABELS.index(q.answer)] for q in qs}

    def model(image, question, options):
        text = right[question.split("Question: ")[-1]]
        return "Answer: " + next(label for label, t in options.items() if t == text)
    return model


def test_harness_oracle_scores_one_and_always_a_scores_zero(tmp_path):
    tsv, qs = mmbench_tsv(tmp_path / "mmbench.tsv", 30)
    rep = evaluate(oracle_for(qs), tsv, tmp_path / "oracle.tsv", progress=False)
    assert (rep.overall.circular, rep.overall.vanilla, rep.overall.questions) == (1.0, 1.0, 30)
    rep = evaluate(lambda image, question, options: "A", tsv, progress=False)
    assert rep.overall.circular == 0.0
    assert rep.overall.vanilla == sum(q.answer == "A" for q in qs) / 30


def test_harness_uniform_guesser_on_two_options(tmp_path):
    # 400 two-option questions: circular ~ Binomial(400, 1/4) / 400, sd 0.022; allow 4 sd.
    qs = [question(i, ("left", "right"), "AB"[i % 2]) for i in range(400)]
    write_tsv(tmp_path / "two.tsv", qs)
    rng = np.random.default_rng(0)
    rep = evaluate(lambda image, question, options: str(rng.choice(list(options))),
                   tmp_path / "two.tsv", progress=False)
    assert abs(rep.overall.circular - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 400)
    assert abs(rep.overall.vanilla - 0.5) < 4 * np.sqrt(0.25 / 400)


def test_harness_passes_the_decoded_image_question_and_shifted_options(tmp_path):
    tsv, qs = mmbench_tsv(tmp_path / "mmbench.tsv", 3)
    seen = []

    def model(image, question, options):
        seen.append((image.size, image.getpixel((0, 0)), question, options))
        return "B"
    evaluate(model, tsv, progress=False)
    assert len(seen) == sum(len(q.options) for q in qs)
    assert seen[0] == ((3, 2), (0, 0, 0), "What is shown in picture 0?",
                       dict(zip(LABELS, qs[0].options, strict=False)))
    second = len(qs[0].options)
    assert seen[second][1] == (1, 0, 0)
    assert seen[second][2] == "Hint: Look closely.\nQuestion: What is shown in picture 1?"
    assert list(seen[1][3].values()) == list(qs[0].options[1:] + qs[0].options[:1])


def test_results_tsv_holds_every_pass_and_reads_back(tmp_path):
    tsv, qs = mmbench_tsv(tmp_path / "mmbench.tsv", 5)
    results = tmp_path / "results.tsv"
    evaluate(lambda image, question, options: "The answer is (B)\tsurely", tsv, results,
             progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with open(results, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    passes = circular_passes(qs)
    assert [int(r["index"]) for r in rows] == [p.index for p in passes]
    assert {r["prediction"] for r in rows} == {"The answer is (B)\tsurely"}
    assert {r["extracted"] for r in rows} == {"B"}
    assert [int(r["hit"]) for r in rows] == [int(p.answer == "B") for p in passes]
    # The results are an MMBench TSV of the passes: read back, they are used as given.
    again = read_tsv(results)
    assert again == passes
    assert circular_passes(again) == passes


def test_progress_bar_is_shown_when_asked(tmp_path, capsys):
    tsv, _ = mmbench_tsv(tmp_path / "mmbench.tsv", 2)
    evaluate(lambda image, question, options: "A", tsv, progress=True)
    assert "CircularEval" in capsys.readouterr().err


def test_nan_options_count_and_file_without_answers(tmp_path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "image"]
    path = write_rows(tmp_path / "test.tsv", header,
                      [["0", "Which?", "nan", "x", "y", "nan", "", ""],
                       ["1", "Which?", "", "x", "y", "z", "", ""]])
    qs = read_tsv(path)
    assert [q.options for q in qs] == [("x", "y"), ("x", "y", "z")]
    assert qs[0].hint == "" and qs[0].answer == ""
    results = tmp_path / "results.tsv"
    assert evaluate(lambda image, question, options: "A", path, results, progress=False) is None
    assert len(read_tsv(results)) == 5


def test_indices_written_as_floats_by_pandas(tmp_path):
    path = write_rows(tmp_path / "floats.tsv", ["index", "question", "A", "B"],
                      [["12.0", "q", "x", "y"]])
    assert read_tsv(path)[0].index == 12


def test_a_released_layout_with_copies_and_image_references(tmp_path):
    # MMBench's own TSVs hold the passes: index i + k * 10^6, image = "i", no g_index column.
    image = png_base64((9, 9, 9))
    header = ["index", "question", "hint", "A", "B", "answer", "category", "l2-category",
              "image"]
    path = write_rows(tmp_path / "released.tsv", header, [
        ["3", "Q?", "", "cat", "dog", "B", "ocr", "perception", image],
        ["1000003", "Q?", "", "dog", "cat", "A", "ocr", "perception", "3"],
        ["8", "R?", "", "up", "down", "A", "ocr", "perception", image]])
    passes = circular_passes(read_tsv(path))
    assert [(p.index, p.g_index) for p in passes] == [(3, 3), (1_000_003, 3), (8, 8)]
    assert passes[1].image == image
    assert decode_image(passes[1].image).getpixel((0, 0)) == (9, 9, 9)
    rep = evaluate(lambda image, question, options: "A", path, progress=False)
    assert (rep.overall.circular, rep.overall.vanilla) == (0.5, 0.5)


@pytest.mark.parametrize(("header", "rows", "message"), [
    (["index", "question"], [["0", "q"]], "no column A in the header"),
    (["index", "question", "A", "B", "C"], [["0", "q", "x", "", "z"]],
     "line 2 .index 0.: options must fill the first columns .A, B, .... without a gap, got AC"),
    (["index", "question", "A", "B", "answer"], [["0", "q", "x", "y", "C"]],
     "answer 'C' is not one of its options' labels AB"),
    (["index", "question", "A"], [["0", "q", "x"], ["0", "q", "x"]], "line 3: index 0 appears "
                                                                      "twice"),
    (["index", "question", "A"], [["zero", "q", "x"]], "index must be a non-negative integer"),
    (["index", "question", "A"], [["-1", "q", "x"]], "index must be a non-negative integer"),
    (["index", "g_index", "question", "A"], [["1000001", "1.5", "q", "x"]],
     "g_index must be a non-negative integer, got '1.5'"),
    (["index", "question", "A"], [["0", "q", "x", "extra"]], "more cells than the header's 3"),
    (["index", "question", "A", "image"], [["0", "q", "x", "5"]],
     "index 0: its image names row 5, which holds no image"),
])
def test_bad_tsv_is_one_clear_error(tmp_path, header, rows, message):
    path = write_rows(tmp_path / "bad.tsv", header, rows)
    with pytest.raises(MMBenchError, match=message) as err:
        read_tsv(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_files_and_images(tmp_path):
    with pytest.raises(MMBenchError, match="missing.tsv: cannot read"):
        read_tsv(tmp_path / "missing.tsv")
    (tmp_path / "latin1.tsv").write_bytes("index\tquestion\tA\n0\tq\t\xe9\n".encode("latin-1"))
    with pytest.raises(MMBenchError, match="latin1.tsv: not UTF-8"):
        read_tsv(tmp_path / "latin1.tsv")
    with pytest.raises(MMBenchError, match="index 3: not a base64 image"):
        decode_image("bm90IGFuIGltYWdl", "index 3")
    path = write_rows(tmp_path / "bad_image.tsv", ["index", "question", "A", "B", "image"],
                      [["0", "q", "x", "y", "!!" * 40]])
    with pytest.raises(MMBenchError, match="bad_image.tsv: index 0: not a base64 image"):
        evaluate(lambda image, question, options: "A", path, progress=False)


def test_no_questions_and_no_results_folder_fail_before_the_model_runs(tmp_path):
    calls = []

    def model(image, question, options):
        calls.append(question)
        return "A"
    empty = write_rows(tmp_path / "empty.tsv", ["index", "question", "A"], [])
    with pytest.raises(MMBenchError, match="empty.tsv: no questions"):
        evaluate(model, empty, progress=False)
    tsv, _ = mmbench_tsv(tmp_path / "mmbench.tsv", 2)
    with pytest.raises(MMBenchError, match="its folder does not exist"):
        evaluate(model, tsv, tmp_path / "nowhere" / "results.tsv", progress=False)
    assert calls == []


def test_copies_without_their_question_are_refused(tmp_path):
    path = write_rows(tmp_path / "orphan.tsv", ["index", "question", "A", "B"],
                      [["1000004", "q", "x", "y"], ["2", "q", "x", "y"]])
    with pytest.raises(MMBenchError, match="passes of question 4 are present but not the "
                                           "question itself"):
        circular_passes(read_tsv(path))


def test_a_model_that_returns_no_string(tmp_path):
    tsv, _ = mmbench_tsv(tmp_path / "mmbench.tsv", 2)
    with pytest.raises(MMBenchError, match="the model returned int for index 0"):
        evaluate(lambda image, question, options: 1, tsv, tmp_path / "r.tsv", progress=False)
    assert not (tmp_path / "r.tsv").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VLMEVALKIT_DIR"),
                    reason="VLMEVALKIT_DIR names no VLMEvalKit checkout")
def test_agrees_with_vlmevalkit():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/circular_eval_vs_vlmevalkit.py"),
                          "--vlmevalkit-dir", os.environ["VLMEVALKIT_DIR"], "--questions", "150",
                          "--seeds", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "0 differences in rotation and scoring" in out.stdout


def test_cli_scores_a_model_named_module_colon_callable(tmp_path, monkeypatch, capsys):
    from mlatlas.cli import main

    tsv, _ = mmbench_tsv(tmp_path / "mmbench.tsv", 12)
    (tmp_path / "always_a.py").write_text("def answer(image, question, options):\n"
                                          "    return 'A'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["mmbench", str(tsv), "--model", "always_a:answer", "--results",
                 str(tmp_path / "out.tsv"), "--no-progress"]) == 0
    overall = next(line for line in capsys.readouterr().out.splitlines() if "overall" in line)
    assert overall.split()[2] == "0.0000"  # always "A" is never right on every rotation
    assert len(read_tsv(tmp_path / "out.tsv")) > 12
    for bad in ("always_a", "always_a:nothing", "no_such_module:answer"):
        assert main(["mmbench", str(tsv), "--model", bad]) == 2
        assert "--model" in capsys.readouterr().err
