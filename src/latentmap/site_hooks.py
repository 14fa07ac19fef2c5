"""An mkdocs hook (``hooks:`` in mkdocs.yml): where the code in a table cell may break.

Material lets inline code break between any two letters (``word-break: break-word``), so a
browser sizing a table gives a column of identifiers almost no width and breaks them mid-word:
``num_worker`` / ``s``, ``trustworthi`` / ``ness``. The site's stylesheet turns that off for
code in tables, and this hook marks where such code may break instead (``<wbr>``): after ``.``,
``/``, ``_``, ``=`` and ``,``, and between the words of a CamelCase name. A first cell that is
nothing but code names what its row is about (a setting, a metric, a file), so it breaks only
after ``.``, ``/`` and ``=``: ``model.`` / ``preprocess_on_device``, and its column is as wide as
its longest part. A value and its ``±`` error stay on one line.
"""

from __future__ import annotations

import re

_TABLE = re.compile(r"<table\b.*?</table>", re.S)
_FIRST_CELL = re.compile(r"(<tr>\s*<td\b[^>]*>)(.*?)(</td>)", re.S)
_CODE = re.compile(r"<code>(.*?)</code>", re.S)
_TAG_OR_TEXT = re.compile(r"(<[^>]*>|&#?\w+;)")  # tags and entities (&lt;, &DoubleRightArrow;, &#x1Fa;) stay whole
# After a separator that a letter or digit follows (after a dot only between names, so 0.5 stays
# whole), or where a lower-case letter or digit meets a capitalised word.
_BREAK = re.compile(r"(?<=[A-Za-z)\]}]\.)(?=[A-Za-z$_])|(?<=[/_=,])(?=[A-Za-z0-9$])|(?<=[a-z0-9])(?=[A-Z][a-z])")
_NAME_BREAK = re.compile(r"(?<=[A-Za-z)\]}]\.)(?=[A-Za-z$_])|(?<=[/=])(?=[A-Za-z0-9$])")
_PLUS_MINUS = re.compile(r"(\d) ± (\d)")  # a value and its error stay on one line: 0.973 ± 0.009
_MARK = "\x00"  # a first cell's code, already given its break points


def breakable(code_html: str, at: re.Pattern = _BREAK) -> str:
    """The HTML of a code span with ``<wbr>`` at its break points; tags and entities untouched."""
    parts = _TAG_OR_TEXT.split(code_html)
    return "".join(part if part.startswith(("<", "&")) and _TAG_OR_TEXT.fullmatch(part) else at.sub("<wbr>", part)
                   for part in parts)


def tables_with_breaks(html: str) -> str:
    """``html`` with every table's code spans given their break points, and each ``value ± error``
    held together."""
    def first_cell(match: re.Match) -> str:
        if re.sub(r"<[^>]*>", "", _CODE.sub("", match[2])).strip(" ,\n"):  # prose that mentions code: usual breaks
            return match[0]
        code = _CODE.sub(lambda c: f"<code{_MARK}>{breakable(c[1], _NAME_BREAK)}</code>", match[2])
        return match[1] + code + match[3]

    def table(match: re.Match) -> str:
        marked = _PLUS_MINUS.sub("\\1&nbsp;±&nbsp;\\2", _FIRST_CELL.sub(first_cell, match[0]))
        return _CODE.sub(lambda code: f"<code>{breakable(code[1])}</code>", marked).replace(f"<code{_MARK}>", "<code>")

    return _TABLE.sub(table, html)


def on_page_content(html: str, **_) -> str:
    return tables_with_breaks(html)
