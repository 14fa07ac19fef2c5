"""The commands README.md gives a user, as the README writes them (shared by test_readme)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def commands(text: str | None = None) -> list[str]:
    """Every command of README.md, in order, whitespace normalised: each line of a ```bash block
    (continuation lines joined, trailing comments dropped) and each inline `code` span that runs
    python, pip or mlflow."""
    text = README.read_text() if text is None else text
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
