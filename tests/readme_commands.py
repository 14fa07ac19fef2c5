"""The commands README.md and the documentation pages give a user, as they write them (shared by
test_readme). The generated reference pages (docs/reference/) hold no commands of their own."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted(p for p in (ROOT / "docs").glob("*.md"))]


def commands(text: str | None = None) -> list[str]:
    """Every command of README.md and the documentation pages, in order, whitespace normalised:
    each line of a ```bash block (continuation lines joined, trailing comments dropped) and each
    inline `code` span that runs python, pip or mlflow."""
    text = "\n".join(page.read_text() for page in PAGES) if text is None else text
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.split(r"\s#\s", f" {line} ", maxsplit=1)[0].strip()
            if line:
                found.append(" ".join(line.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if re.search(r"(^|\s)(python|pip|mlflow) ", span) and span not in found:
            found.append(span)
    return found
