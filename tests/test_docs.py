"""The documentation: the MkDocs site builds with no warning, and the README stays a front door."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_documentation_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: a broken link, a page left out of the nav or a docstring the
    API reference cannot read fails the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner, not a warning
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "plugin" / "index.html").is_file()


def test_the_readme_is_short_has_contents_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 320
    assert re.search(r"^## (Table of )?[Cc]ontents$", readme, re.MULTILINE)
    # Markdown links and images outside code blocks: [text](target "title")
    prose = re.sub(r"^```.*?^```", "", readme, flags=re.MULTILINE | re.DOTALL)
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    assert targets, "the README links to its documentation"
    relative = [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", t, re.I)]
    assert relative, "the README links to its documentation pages"
    missing = [t for t in relative if not (REPO / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
