"""Build hooks of the documentation site (mkdocs.yml): KaTeX is served from the site itself.

`make docs` unpacks a pinned KaTeX from the npm registry into build/katex/; this hook adds its
stylesheet, script and fonts to the site as assets/katex/, so a reader offline sees the maths.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

KATEX = Path(__file__).resolve().parents[1] / "build" / "katex"


def on_files(files: Files, config) -> Files:
    if not (KATEX / "katex.min.js").is_file():
        raise PluginError(f"KaTeX is not unpacked in {KATEX}: build the site with `make docs`")
    for path in sorted(KATEX.rglob("*")):
        if path.is_file():
            uri = f"assets/katex/{path.relative_to(KATEX).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
