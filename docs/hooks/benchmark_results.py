"""MkDocs hook: the results pages show the plots and full tables committed in `benchmarks/results/`, without a
copy of them in `docs/`.

Why: a copy would go stale the next time a benchmark rewrites its files. The pages link those files the way
GitHub resolves them, relative to the page (`../../benchmarks/results/NAME.png` from `docs/results/`), so
the same Markdown shows the plots on GitHub and in the site. MkDocs only knows files under `docs/`, so this
hook adds every file of `benchmarks/results/` to the build under the source path such a link resolves to
(`../benchmarks/results/NAME`), written to `benchmarks/results/NAME` in the site. A link to a file that is
not there still fails `mkdocs build --strict`.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files, InclusionLevel

RESULTS = Path("benchmarks") / "results"
# Only what pages show or link; the JSON beside each table is the benchmark's raw output.
SHOWN_SUFFIXES = {".png", ".md"}


def on_files(files: Files, config: MkDocsConfig) -> Files:
    docs_dir = Path(config.docs_dir)
    results_dir = docs_dir.parent / RESULTS
    for path in sorted(results_dir.iterdir()):
        if path.suffix not in SHOWN_SUFFIXES or not path.is_file():
            continue
        site_path = (RESULTS / path.name).as_posix()
        files.append(
            File(
                f"../{site_path}",
                str(docs_dir),
                config.site_dir,
                config.use_directory_urls,
                dest_uri=site_path if path.suffix != ".md" else site_path[: -len(".md")] + "/index.html",
                # the full tables are reachable from the pages that link them, not from the navigation
                inclusion=InclusionLevel.NOT_IN_NAV,
            )
        )
    return files
