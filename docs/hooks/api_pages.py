"""MkDocs hook: one API reference page per stage of the core (`reference/<stage>.md`), listing every public
module the stage's folder holds when the site is built.

Why generated: modules split and move between stages as the code grows; a hand-kept list would either miss
the new ones or name ones that no longer exist. Each page opens with the stage's package docstring (its one
job) and renders each module with mkdocstrings, so a docstring reference that does not resolve still fails
`mkdocs build --strict`. The public top-level names have their own hand-written page (`reference/index.md`).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

PACKAGE = "difficulty_router"
# The stages from the bottom up, as the import-linter layers contract in pyproject.toml orders them
# (the command line, on top, has no API of its own).
STAGES = ["core", "data", "extraction", "learning", "routing", "training", "calling", "evaluation", "server", "scale"]


def stage_modules(package_dir: Path, stage: str) -> list[str]:
    """The stage's public modules, dotted below the stage (`dispatch`, `dispatch.binding`), sorted: nested
    packages count (by their `__init__`), names starting with `_` and `__main__` do not."""
    modules = []
    for path in (package_dir / stage).rglob("*.py"):
        parts = list(path.relative_to(package_dir / stage).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts and not any(part.startswith("_") for part in parts):
            modules.append(".".join(parts))
    return sorted(modules)


def stage_page(package_dir: Path, stage: str) -> str:
    lines = [
        f"# `{PACKAGE}.{stage}`",
        "",
        f"::: {PACKAGE}.{stage}",
        "    options:",
        "      members: false",
        "      show_root_heading: false",
        "",
    ]
    for module in stage_modules(package_dir, stage):
        lines += [f"::: {PACKAGE}.{stage}.{module}", ""]
    return "\n".join(lines)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    package_dir = Path(config.docs_dir).parent / "shared" / PACKAGE
    for stage in STAGES:
        files.append(File.generated(config, f"reference/{stage}.md", content=stage_page(package_dir, stage)))
    return files
