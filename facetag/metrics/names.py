"""Score a tag run against the names expected in each photo (knn_examples/expected.csv).

expected.csv has a header ``image,names`` and one row per photo: the photo's path relative
to the CSV's folder and the names expected in it, separated by ``;``, where ``unknown``
stands for a face of someone not enrolled:

    image,names
    test/obama_and_biden.jpg,obama;biden;unknown

Name precision and recall count names, not boxes (the CSV has no boxes): in a photo the
true positives are the names both expected and given (as multisets), so

    precision = sum TP / names given        recall = sum TP / names expected

A face given a name that is not expected there is a wrong name (precision drops); an
expected person left unnamed is missed (recall drops). Faces left unknown are counted
and compared with the ``unknown`` entries but do not enter either figure: a stray
detection of a background face that stays unknown is harmless.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facetag.errors import DataError

UNKNOWN = "unknown"


def read_expected(path: Path) -> dict[str, list[str]]:
    """expected.csv -> {absolute photo path: [names, 'unknown' ...]}; DataError if malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise DataError(
            f"{path}: expected a readable CSV (image,names), got {reason}; check the path"
        ) from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip() for c in rows[0][:2]] != ["image", "names"]:
        raise DataError(
            f"{path}: expected a header line 'image,names', got "
            f"{','.join(rows[0]) if rows else 'an empty file'!r}; add it"
        )
    out: dict[str, list[str]] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip():
            raise DataError(
                f"{path}:{n}: expected 'image,name1;name2', got {','.join(row)!r}; fix the line"
            )
        photo = str((path.parent / row[0].strip()).resolve())
        out[photo] = [s.strip() for s in row[1].split(";") if s.strip()]
    return out


@dataclass
class PhotoScore:
    path: str
    expected: list[str]  # names and 'unknown's
    given: list[str]  # names given, in face order ('unknown' for faces left unnamed)
    tp: int
    wrong: list[str]  # names given but not expected here
    missed: list[str]  # expected names not given

    @property
    def ok(self) -> bool:
        return not self.wrong and not self.missed


@dataclass
class Score:
    photos: list[PhotoScore] = field(default_factory=list)
    not_tagged: list[str] = field(default_factory=list)  # expected photos absent from the run

    @property
    def tp(self) -> int:
        return sum(p.tp for p in self.photos)

    @property
    def given(self) -> int:
        return sum(sum(n != UNKNOWN for n in p.given) for p in self.photos)

    @property
    def expected(self) -> int:
        named = sum(sum(n != UNKNOWN for n in p.expected) for p in self.photos)
        return named + sum(1 for _ in self.not_tagged)  # an untagged photo misses its names

    @property
    def precision(self) -> float:
        return self.tp / self.given if self.given else 1.0

    @property
    def recall(self) -> float:
        return self.tp / self.expected if self.expected else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "names_expected": self.expected,
            "names_given": self.given,
            "correct": self.tp,
            "photos": [
                {
                    "path": p.path,
                    "expected": p.expected,
                    "given": p.given,
                    "wrong": p.wrong,
                    "missed": p.missed,
                }
                for p in self.photos
            ],
            "not_tagged": self.not_tagged,
        }


def score_tags(images: Iterable[Mapping[str, Any]], expected: Mapping[str, list[str]]) -> Score:
    """Compare the ``images`` of a tag JSON with read_expected's answer (module doc)."""
    score = Score()
    seen: set[str] = set()
    for image in images:
        key = str(Path(image["path"]).resolve())
        if key not in expected:
            continue
        seen.add(key)
        want = expected[key]
        given = [f["name"] or UNKNOWN for f in image["faces"]]
        want_c = Counter(n for n in want if n != UNKNOWN)
        given_c = Counter(n for n in given if n != UNKNOWN)
        tp = sum((want_c & given_c).values())
        score.photos.append(
            PhotoScore(
                path=str(image["path"]),
                expected=list(want),
                given=given,
                tp=tp,
                wrong=sorted((given_c - want_c).elements()),
                missed=sorted((want_c - given_c).elements()),
            )
        )
    score.not_tagged = sorted(k for k in expected if k not in seen)
    return score


def format_score(score: Score) -> str:
    """The table the demo prints: each photo, who was expected, who was found, ok or not."""
    rows = [("photo", "expected", "found", "")]
    for p in score.photos:
        mark = (
            "ok"
            if p.ok
            else "; ".join(
                [f"wrong: {', '.join(p.wrong)}"] * bool(p.wrong)
                + [f"missed: {', '.join(p.missed)}"] * bool(p.missed)
            )
        )
        rows.append((Path(p.path).name, ", ".join(p.expected), ", ".join(p.given) or "-", mark))
    for path in score.not_tagged:
        rows.append((Path(path).name, "", "not tagged", "missed"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    lines.append(
        f"name precision {score.precision:.3f} ({score.tp}/{score.given}), "
        f"recall {score.recall:.3f} ({score.tp}/{score.expected})"
    )
    return "\n".join(line.rstrip() for line in lines)
