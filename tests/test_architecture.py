"""The layering of docs/architecture.md, checked on the source: core and nn import no family,
families import core, nn, data and eval (and each other only where one method is built on
another), and nothing below the top imports the registry or the command line."""

import ast
import importlib
import sys
from pathlib import Path

import pytest

import mlatlas

ROOT = Path(mlatlas.__file__).parent
FAMILIES = {"generative", "rl", "llm", "contrastive", "vision", "multimodal"}
SHARED = {"core", "nn", "data", "eval"}
TOP = {"registry", "cli", "launch", "__main__"}
# Where one family is truly built on another (docs/architecture.md, "Which package imports
# which"): GRPO and PPO-RLHF reuse RL's returns and GAE.
BUILT_ON = {("llm", "mlatlas.rl.returns"),
            # Latent diffusion's caption encoder is the contrastive family's text tower: a CLIP
            # run's, or the same tower and tokenizer trained with the denoiser.
            ("generative", "mlatlas.contrastive.clip"), ("generative", "mlatlas.contrastive.text"),
            ("generative", "mlatlas.contrastive.common"),
            # The vision-language model trains its encoder with SigLIP's loss against the
            # contrastive text tower, its decoder reuses the LM's attention mask, and its RL
            # stage GRPO's and Kimi k1.5's objectives.
            ("multimodal", "mlatlas.contrastive.losses"),
            ("multimodal", "mlatlas.contrastive.text"),
            ("multimodal", "mlatlas.llm.model"), ("multimodal", "mlatlas.llm.common"),
            ("multimodal", "mlatlas.llm.grpo"), ("multimodal", "mlatlas.llm.kimi")}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "mlatlas" or n.startswith("mlatlas.")}


def package(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[0]


def edges():
    for path in sorted(ROOT.rglob("*.py")):
        if path.relative_to(ROOT).parts[:2] == ("rl", "llm"):
            continue  # the deprecated alias of mlatlas.llm
        for name in imports(path):
            target = name.split(".")[1] if "." in name else "mlatlas"
            yield path.relative_to(ROOT).as_posix(), package(path), target, name


def test_core_and_nn_import_no_family_and_nothing_imports_the_top():
    bad = [(f, n) for f, src, dst, n in edges()
           if (src in SHARED and dst in FAMILIES | TOP and not (src in {"data", "eval"}
                                                                 and dst in SHARED))
           or (src not in TOP and dst in TOP)]
    assert not bad, bad


def test_families_import_each_other_only_where_one_is_built_on_another():
    bad = [(f, n) for f, src, dst, n in edges()
           if src in FAMILIES and dst in FAMILIES and dst != src
           and (src, n) not in BUILT_ON]
    assert not bad, bad


def test_core_imports_only_core():
    bad = [(f, n) for f, src, dst, n in edges() if src == "core" and dst not in {"core", "mlatlas"}]
    assert not bad, bad


def test_nn_imports_only_core_and_nn():
    bad = [(f, n) for f, src, dst, n in edges() if src == "nn" and dst not in {"core", "nn"}]
    assert not bad, bad


def test_the_old_language_model_path_is_a_deprecated_alias():
    for name in [n for n in sys.modules if n.startswith("mlatlas.rl.llm")]:
        del sys.modules[name]
    with pytest.warns(DeprecationWarning, match="mlatlas.rl.llm moved to mlatlas.llm"):
        old = importlib.import_module("mlatlas.rl.llm.grpo")
    assert old is importlib.import_module("mlatlas.llm.grpo")
    from mlatlas.rl.llm.model import TinyLM

    assert TinyLM is importlib.import_module("mlatlas.llm.model").TinyLM
