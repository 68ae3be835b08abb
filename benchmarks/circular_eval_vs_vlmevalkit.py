"""mlatlas.eval.circular against VLMEvalKit's own CircularEval code, run side by side.

VLMEvalKit (github.com/open-compass/VLMEvalKit) is not a package here: point ``--vlmevalkit-dir``
at a checkout. The script imports, from that checkout, ``vlmeval.dataset.utils.multiple_choice``
(``mcq_circular_eval``, ``report_acc``) and ``vlmeval.utils.matching_util.can_infer``, and takes
the ``CIRCULAR`` function (``vlmutil circular``, the rotation that builds the MMBench TSVs) out
of ``vlmeval/tools.py``. The packages' ``__init__`` files import every model and dataset
(torch, transformers, ...), so the script registers the packages without running them; the
functions it calls are VLMEvalKit's, unchanged. Their imports need pandas, Pillow,
huggingface_hub, filelock, validators and sty; the last two are not in the project's
environment:

    pip install --target /tmp/vlmeval-deps validators sty
    PYTHONPATH=/tmp/vlmeval-deps .venv/bin/python benchmarks/circular_eval_vs_vlmevalkit.py \\
        --vlmevalkit-dir /path/to/VLMEvalKit [--questions 400] [--seeds 5]

It first prints a uniform guesser's CircularEval and vanilla means for N = 2, 3, 4 over 50
seeds x 5,000 questions beside (1/N)^N and 1/N. Then, on a generated MMBench TSV
(``--questions`` questions with 2, 3 or 4 options, a few of them with options that name labels,
which neither side rotates) it checks:

1. rotation: VLMEvalKit's ``CIRCULAR`` output and ``circular_passes`` give the same passes
   (index, g_index, options in order, answer, image);
2. scoring: for several models (uniform guessers over --seeds seeds, always "A", an oracle, a
   model right 70 % of the time) whose replies are labels, ``mcq_circular_eval`` in exact
   matching mode (no judge model), and ``mcq_vanilla_eval`` on the original orders (what
   VLMEvalKit's PRINT_VANILLA=1 reports as vanilla_0), each with ``report_acc``, against
   ``report``: the per-question hits and every overall, l2-category and category accuracy,
   circular and vanilla, must be equal;
3. extraction: free-form replies of several templates through ``can_infer`` and
   ``extract_answer``; disagreements are printed (the two rule sets differ on purpose in places:
   see docs/methods/circular_eval.md), and the scoring of step 2 is repeated on these replies,
   each side with its own extraction, and with VLMEvalKit scoring our extracted labels.

Exits 1 if step 1 or 2 finds a difference.
"""

from __future__ import annotations

import argparse
import ast
import base64
import importlib
import io
import os
import string
import sys
import tempfile
import types
import warnings
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
from PIL import Image

from mlatlas.eval.circular import (
    LABELS,
    Question,
    circular_passes,
    extract_answer,
    read_tsv,
    report,
    score_passes,
    write_tsv,
)

CATEGORIES = {  # l2-category -> categories, MMBench's names
    "coarse_perception": ("image_scene", "image_style"),
    "finegrained_perception (instance-level)": ("object_localization", "attribute_recognition"),
    "logic_reasoning": ("structuralized_imagetext_understanding",),
    "relation_reasoning": ("spatial_relationship", "social_relation"),
}
WORDS = ("cat", "dog", "red", "blue", "two", "three", "left", "right", "tree", "car", "sunny",
         "rainy", "a man", "a woman", "indoors", "outdoors", "square", "circle", "happy", "sad")


def load_vlmevalkit(root: Path) -> dict:
    """VLMEvalKit's functions, imported from the checkout at ``root``."""
    if not (root / "vlmeval" / "tools.py").is_file():
        sys.exit(f"--vlmevalkit-dir {root}: no vlmeval/tools.py there; give a VLMEvalKit checkout")
    for name in ("vlmeval", "vlmeval.dataset", "vlmeval.dataset.utils"):
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = package
    try:
        mc = importlib.import_module("vlmeval.dataset.utils.multiple_choice")
        smp = importlib.import_module("vlmeval.smp")
    except ImportError as err:
        sys.exit(f"VLMEvalKit's scoring module does not import ({err}); see this script's "
                 "docstring for its light dependencies")
    tools = (root / "vlmeval" / "tools.py").read_text()
    node = next(n for n in ast.parse(tools).body
                if isinstance(n, ast.FunctionDef) and n.name == "CIRCULAR")
    namespace = {name: getattr(smp, name) for name in dir(smp) if not name.startswith("_")}
    namespace.update(pd=mc.pd, string=string, deque=deque, defaultdict=defaultdict,
                     warnings=warnings, osp=os.path)
    exec(compile(ast.Module([node], []), str(root / "vlmeval" / "tools.py"), "exec"), namespace)
    return dict(circular=namespace["CIRCULAR"], mcq_circular_eval=mc.mcq_circular_eval,
                mcq_vanilla_eval=mc.mcq_vanilla_eval, report_acc=mc.report_acc,
                abbrs=mc.MMB_abbrs, can_infer=mc.can_infer, load=smp.load)


def tiny_png(seed: int) -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def generated_questions(n: int, seed: int) -> list[Question]:
    rng = np.random.default_rng(seed)
    l2 = list(CATEGORIES)
    questions = []
    for i in range(n):
        n_options = int(rng.integers(2, 5))
        options = [str(w) for w in rng.choice(WORDS, n_options, replace=False)]
        if i % 25 == 7:  # an option that names labels: neither side rotates the question
            options[-1] = "Both A and B"
        l2_category = l2[int(rng.integers(len(l2)))]
        questions.append(Question(
            index=i, g_index=i, question=f"Question {i}: which is shown?",
            hint="A hint." if i % 3 == 0 else "", options=tuple(options),
            answer=LABELS[int(rng.integers(n_options))],
            category=str(rng.choice(CATEGORIES[l2_category])), l2_category=l2_category,
            image=tiny_png(i)))
    return questions


def compare_rotation(peer: dict, tsv: Path) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer["circular"](str(tsv))
    theirs = read_tsv(tsv.with_name(tsv.stem + "_circular.tsv"))
    ours = circular_passes(read_tsv(tsv))
    key = {q.index: q for q in theirs}
    problems = []
    if sorted(key) != sorted(q.index for q in ours):
        problems.append(f"index sets differ: {len(key)} theirs, {len(ours)} ours")
    for q in ours:
        t = key.get(q.index)
        if t is not None and (t.g_index, t.options, t.answer, t.image) != (
                q.g_index, q.options, q.answer, q.image):
            problems.append(f"index {q.index}: theirs {t.options} -> {t.answer}, "
                            f"ours {q.options} -> {q.answer}")
    print(f"rotation: {len(ours)} passes of {len(set(q.g_index for q in ours))} questions; "
          f"{len(problems)} differences")
    return problems


def vlmevalkit_report(peer: dict, tsv: Path, replies: dict[int, str], work: Path):
    """Per-question hits by index and {name: accuracy} of mcq_circular_eval, and of
    mcq_vanilla_eval on the original orders (VLMEvalKit's "vanilla_0"), each with report_acc."""
    data = peer["load"](str(tsv))
    data["prediction"] = [replies[int(i)] for i in data["index"]]
    results = {}
    for kind, rows, scorer in (("circular", data, peer["mcq_circular_eval"]),
                               ("vanilla", data[data["index"] == data["g_index"]],
                                peer["mcq_vanilla_eval"])):
        result_file = work / f"result_{len(list(work.iterdir()))}.pkl"
        scored = scorer(None, rows.copy(), rows.copy(), 1, str(result_file), "MMBench")
        hits = dict(zip(scored["index"].astype(int), scored["hit"].astype(int), strict=True))
        table = peer["report_acc"](scored)
        results[kind] = hits, {k: float(table[k][0]) for k in table.columns if k != "split"}
    return results


def our_report(passes: list[Question], replies: dict[int, str]):
    extracted = [extract_answer(replies[q.index], q.options) for q in passes]
    rep = report(passes, extracted)
    wrong, first = defaultdict(int), {}
    for q, label in zip(passes, extracted, strict=True):
        wrong[q.g_index] += label != q.answer
        if q.index == q.g_index:
            first[q.g_index] = int(label == q.answer)
    hits = {"circular": {g: int(w == 0) for g, w in wrong.items()}, "vanilla": first}
    return hits, rep, extracted


def compare_scores(peer: dict, tsv: Path, passes: list[Question], replies: dict[int, str],
                   work: Path, name: str) -> list[str]:
    theirs = vlmevalkit_report(peer, tsv, replies, work)
    our_hits, rep, _ = our_report(passes, replies)
    problems = []
    for kind in ("circular", "vanilla"):
        their_hits, their_acc = theirs[kind]
        problems += [f"{name}, {kind}: question {g}: hit {their_hits.get(g)} theirs, {h} ours"
                     for g, h in our_hits[kind].items() if their_hits.get(g) != h]
        if set(their_hits) != set(our_hits[kind]):
            problems.append(f"{name}, {kind}: scored questions differ")
        ours = {"Overall": getattr(rep.overall, kind)}
        for accs in (rep.l2_category, rep.category):
            ours.update({peer["abbrs"].get(k, k): getattr(a, kind) for k, a in accs.items()})
        for key in sorted(set(ours) | set(their_acc)):
            a, b = their_acc.get(key), ours.get(key)
            if a is None or b is None or abs(a - b) > 1e-12:
                problems.append(f"{name}, {kind}: {key}: {a} theirs, {b} ours")
    print(f"{name:<24} circular {rep.overall.circular:.4f} (VLMEvalKit "
          f"{theirs['circular'][1]['Overall']:.4f})  vanilla {rep.overall.vanilla:.4f} "
          f"(VLMEvalKit {theirs['vanilla'][1]['Overall']:.4f})  groups {rep.overall.questions}"
          f"  differences {len(problems)}")
    return problems


def closed_forms(seeds: int, questions: int) -> None:
    """A uniform guesser's mean over seeds x questions, vectorised through score_passes."""
    print(f"uniform guesser, {seeds} seeds x {questions} questions (score_passes):")
    for n in (2, 3, 4):
        g = seeds * questions
        rng = np.random.default_rng(n)
        correct = rng.integers(0, n, (g, n)) == rng.integers(0, n, (g, n))
        _, circular, vanilla = score_passes(correct.ravel(), np.repeat(np.arange(g), n),
                                            np.tile(np.arange(n) == 0, g))
        p = (1 / n) ** n
        sd = np.sqrt(p * (1 - p) / g)
        print(f"    N = {n}: circular {circular.mean():.5f} (1/N)^N = {p:.5f}, "
              f"{(circular.mean() - p) / sd:+.2f} sd; vanilla {vanilla.mean():.4f} "
              f"(1/N = {1 / n:.4f})")


def uniform_expectation(passes: list[Question]) -> float:
    """A uniform guesser's expected CircularEval score: the mean over groups of (1/N)^passes."""
    count = defaultdict(int)
    for q in passes:
        count[(q.g_index, len(q.options))] += 1
    return float(np.mean([(1 / n) ** k for (_, n), k in count.items()]))


def letter_models(passes: list[Question], seeds: int) -> dict[str, dict[int, str]]:
    models = {}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        models[f"uniform guesser s{seed}"] = {
            q.index: LABELS[int(rng.integers(len(q.options)))] for q in passes}
    models["always A"] = {q.index: "A" for q in passes}
    models["oracle"] = {q.index: q.answer for q in passes}
    rng = np.random.default_rng(100)
    models["right 70%"] = {q.index: q.answer if rng.random() < 0.7
                           else LABELS[int(rng.integers(len(q.options)))] for q in passes}
    return models


def free_form(passes: list[Question], seed: int) -> dict[int, str]:
    """Replies in the shapes models write, right 70 % of the time."""
    rng = np.random.default_rng(seed)
    templates = ("{L}", "({L})", "Answer: {L}", "The answer is {L}.", "{L}. {T}", "{T}",
                 "The correct option is ({L}) because the image shows it.", "I think it's {T}.",
                 "Sorry, I can't help with images of people yet.", "Cannot determine the answer",
                 "Either {L} or {M}.", "**{L}**", "{l}")
    replies = {}
    for q in passes:
        j = q.labels.index(q.answer) if rng.random() < 0.7 else int(rng.integers(len(q.options)))
        m = (j + 1) % len(q.options)
        t = templates[int(rng.integers(len(templates)))]
        replies[q.index] = t.format(L=LABELS[j], l=LABELS[j].lower(), T=q.options[j],
                                    M=LABELS[m])
    return replies


def compare_extraction(peer: dict, passes: list[Question], replies: dict[int, str]) -> None:
    disagree = defaultdict(int)
    for q in passes:
        reply = replies[q.index]
        theirs = peer["can_infer"](reply, dict(zip(q.labels, q.options, strict=True))) or "Z"
        ours = extract_answer(reply, q.options)
        if theirs != ours:
            disagree[(reply if reply not in q.options else "<option text>", theirs, ours)] += 1
    print(f"extraction: {len(passes) - sum(disagree.values())} of {len(passes)} free-form "
          "replies agree")
    for (reply, theirs, ours), count in sorted(disagree.items(), key=lambda kv: -kv[1])[:10]:
        print(f"    {count:4d} x {reply!r}: VLMEvalKit {theirs}, ours {ours}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vlmevalkit-dir", type=Path, required=True,
                        help="a VLMEvalKit checkout (the folder holding vlmeval/)")
    parser.add_argument("--questions", type=int, default=400, help="generated questions")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the uniform guesser")
    args = parser.parse_args()
    os.environ["PRED_FORMAT"] = "tsv"  # mcq_circular_eval's scratch file; xlsx needs openpyxl
    peer = load_vlmevalkit(args.vlmevalkit_dir.resolve())
    closed_forms(seeds=50, questions=5000)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tsv = work / "generated.tsv"
        write_tsv(tsv, generated_questions(args.questions, seed=0))
        problems = compare_rotation(peer, tsv)
        circular_tsv = work / "circular.tsv"
        passes = circular_passes(read_tsv(tsv))
        write_tsv(circular_tsv, passes)
        scratch = work / "results"
        scratch.mkdir()
        print(f"a uniform guesser's expected circular score on these questions: "
              f"{uniform_expectation(passes):.4f}")
        for name, replies in letter_models(passes, args.seeds).items():
            problems += compare_scores(peer, circular_tsv, passes, replies, scratch, name)
        replies = free_form(passes, seed=1)
        compare_extraction(peer, passes, replies)
        print("free-form replies, each side extracting with its own rules:")
        compare_scores(peer, circular_tsv, passes, replies, scratch, "free-form")
        _, _, extracted = our_report(passes, replies)
        ours_extracted = {q.index: label for q, label in zip(passes, extracted, strict=True)}
        problems += compare_scores(peer, circular_tsv, passes, ours_extracted, scratch,
                                   "free-form, our labels")
    for problem in problems[:20]:
        print("DIFFERENCE", problem)
    print(f"{len(problems)} differences in rotation and scoring")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
