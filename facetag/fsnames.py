"""File names that are not UTF-8 (old Windows and Samba shares, cameras, zip files).

On POSIX Python decodes such a name with ``surrogateescape``: each byte that is not UTF-8
becomes a lone surrogate U+DC80..U+DCFF, which ``os.fsencode`` turns back into the byte.
That string opens the file, but ``str.encode("utf-8")`` and a terminal refuse it, so every
place that writes a path goes through one of these:

- ``json_text``: JSON as UTF-8 text with each lone surrogate written as its ``\\udcXX``
  escape; ``json.loads`` gives back the same string, hence the same file.
- ``printable``: the name as a person reads it, each undecodable byte shown as ``\\xNN``.
"""

from __future__ import annotations

import json
import re
from typing import Any

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_text(obj: Any, **kwargs: Any) -> str:
    """json.dumps(obj, ensure_ascii=False, **kwargs), with lone surrogates escaped."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    # Lone surrogates only occur inside JSON strings, where \uXXXX is the escape for them.
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def printable(text: str) -> str:
    """``text`` for a terminal or a log: bytes of a non-UTF-8 file name as ``\\xNN``."""
    if not _LONE_SURROGATE.search(text):
        return text
    raw = text.encode("utf-8", "surrogateescape") if _escapable(text) else None
    if raw is None:
        return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return raw.decode("utf-8", "backslashreplace")


def _escapable(text: str) -> bool:
    """True when every lone surrogate in text is one surrogateescape made (U+DC80..DCFF)."""
    return all(0xDC80 <= ord(c) <= 0xDCFF for c in _LONE_SURROGATE.findall(text))
