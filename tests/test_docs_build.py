"""The documentation site, with the API reference generated from the docstrings, builds in strict mode."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_builds_strict(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in (
        "create_mednext",
        "load_pretrained",
        "Segmenter",
        "from_results",
        "PredictSettings",
        "deployment_info",
    ):
        assert name in api, f"the API reference lacks {name}"
    assert (site / "guide" / "index.html").is_file() and (site / "deploy" / "index.html").is_file()
