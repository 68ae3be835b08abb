"""The built API reference holds every public function and class of the package.

Reads the site `make docs` built (the folder named by MLATLAS_SITE, default site/) and checks
that each module listed on docs/api/*.md has, on its API page, an entry (mkdocstrings' anchor
``id="module.name"``) for every public function and class the module defines, beside the
module's docstring with its equations. Run with `make docs-check`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("MLATLAS_SITE", ROOT / "site"))


def api_pages() -> dict[str, list[str]]:
    """{api page slug: the modules it renders}."""
    return {page.stem: re.findall(r"^::: (\S+)", page.read_text(), flags=re.M)
            for page in sorted((ROOT / "docs" / "api").glob("*.md"))}


@pytest.fixture(scope="module")
def site() -> Path:
    if not (SITE / "index.html").is_file():
        reason = f"no built site in {SITE}: run `make docs`"
        if os.environ.get("MLATLAS_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return SITE


def public_members(name: str) -> list[str]:
    module = importlib.import_module(name)
    return [n for n, obj in vars(module).items() if not n.startswith("_")
            and (inspect.isfunction(obj) or inspect.isclass(obj))
            and obj.__module__ == name]


@pytest.mark.parametrize(("slug", "modules"), list(api_pages().items()))
def test_every_public_function_is_documented(site, slug, modules):
    html = (site / "api" / slug / "index.html").read_text()
    ids = set(re.findall(r'id="([\w.]+)"', html))
    missing = [f"{m}.{n}" for m in modules for n in public_members(m) if f"{m}.{n}" not in ids]
    missing += [m for m in modules if m not in ids]
    assert not missing, f"api/{slug}: no entry for {missing}"


def test_module_docstrings_carry_their_equations(site):
    """The samplers' docstring, equations included, is on the diffusion API page."""
    html = (site / "api" / "diffusion" / "index.html").read_text()
    assert "Karras et al. 2022, Algorithms 1 and 2" in html
    assert "sigma_hat = (1 + gamma_i) sigma_i" in html
