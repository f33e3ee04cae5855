"""The docs quote the real code: every quoted block still matches its source file."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "docs" / "extending.md"]


def quoted_blocks(text: str) -> list[tuple[str, str]]:
    """(file, code) for each fenced block whose first line is `# FILE.py`."""
    blocks = re.findall(r"```python\n# (\S+\.py)\n(.*?)```", text, re.S)
    return [(name, code.rstrip("\n")) for name, code in blocks]


def test_quoted_blocks_are_found_with_their_files():
    text = "x\n```python\n# smat.py\n    a = 1\n```\n```bash\nls\n```\n"

    assert quoted_blocks(text) == [("smat.py", "    a = 1")]


def test_every_quote_in_the_guides_matches_its_source():
    for guide in GUIDES:
        blocks = quoted_blocks(guide.read_text())
        assert blocks, f"{guide.name} quotes no code"
        stale = [(name, code.splitlines()[0]) for name, code in blocks if code not in (ROOT / name).read_text()]
        assert stale == [], f"{guide.name}: these quotes no longer match their source: {stale}"


def test_the_readmes_file_table_names_every_module():
    readme = (ROOT / "README.md").read_text()

    assert [p.name for p in sorted(ROOT.glob("*.py")) if f"`{p.name}`" not in readme] == []
