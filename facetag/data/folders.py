"""Face datasets in the person-folder layout: <root>/<person>/<image>.

scan_folder finds the people and their images (sorted, so labels never depend on the
filesystem's order), split picks train and test images per person from a seed,
content_hash fingerprints the data for a run's record, info diagnoses a folder, and
FaceDataset turns samples into model-ready tensors, decoding each file once.
"""

import hashlib
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from facetag.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    is_image_file,
    load_image,
)
from facetag.data.transforms import AugmentConfig, augment_batch, fit_image, normalize
from facetag.errors import ConfigError, DataError

Progress = Callable[[int, int], None]  # (done, total)


class Sample(NamedTuple):
    path: Path
    label: int  # index into the people tuple it came with


@dataclass(frozen=True)
class FaceFolder:
    """A scanned person-folder root. people[i] owns images[i]; both sorted by name."""

    root: Path
    people: tuple[str, ...]
    images: tuple[tuple[Path, ...], ...]
    empty: tuple[str, ...] = ()  # person folders with no image files (not in people)

    @property
    def num_images(self) -> int:
        return sum(len(imgs) for imgs in self.images)

    def samples(self) -> tuple[Sample, ...]:
        """Every image with its label, person by person."""
        return tuple(Sample(p, label) for label, imgs in enumerate(self.images) for p in imgs)


@dataclass(frozen=True)
class Split:
    """Train and test samples chosen per person; labels index `people`."""

    people: tuple[str, ...]
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    spec: str  # as given, e.g. "5/5" or "0.8"
    seed: int


@dataclass(frozen=True)
class FolderInfo:
    """What `info` found in a person-folder root (rendered by format_info)."""

    root: Path
    people: int
    images: int  # images that decode
    per_person: tuple[int, int, float]  # (min, max, median) decodable images per person
    sizes: tuple[tuple[tuple[int, int], int], ...]  # ((W, H), count), most common first
    min_size: tuple[int, int] | None  # smallest W*H, as (W, H)
    max_size: tuple[int, int] | None  # largest W*H
    grey: int  # images whose own kind is grey (L, 16-bit, grey palette)
    colour: int
    problems: tuple[tuple[Path, str], ...]  # (file or folder, what is wrong and the fix)


HELD_OUT_SETS = ("lfw",)  # sets whose people N-Z are held out


def held_out(source: Path | str, person: str) -> bool:
    """True for the people no training may see: LFW people whose folder names start with
    N to Z are facetag's verification and clustering set (facetag evaluate --pairs).

    ``source`` is the set's folder (its name is what counts: ``.../lfw``) or that name.
    """
    return Path(source).name in HELD_OUT_SETS and person[:1].upper() >= "N"


def scan_folder(root: Path | str) -> FaceFolder:
    """Find <root>/<person>/<image> files.

    People are the visible sub-folders that hold at least one image (IMAGE_EXTENSIONS, any
    case); other files (FILES.csv, README, hidden files) are ignored. Raises DataError for
    a missing root or one without person folders.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"{root}: expected a folder of person folders, got no such path; "
            "check the path (our copy of ORL is ../shared/data/orl)"
        )
    if not root.is_dir():
        raise DataError(
            f"{root}: expected a folder of person folders, got a file; "
            f"pass the folder that holds {root.parent}/<person>/*.jpg"
        )
    people: list[str] = []
    images: list[tuple[Path, ...]] = []
    empty: list[str] = []
    for d in _sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        imgs = tuple(_sorted(f for f in d.iterdir() if is_image_file(f)))
        if imgs:
            people.append(d.name)
            images.append(imgs)
        else:
            empty.append(d.name)
    if not people:
        loose = [f for f in root.iterdir() if is_image_file(f)]
        hint = (
            f" (found {len(loose)} images directly in it: move each person's images into "
            "their own folder)"
            if loose
            else ""
        )
        raise DataError(f"{root} has no person folders; expected {root}/<person>/*.jpg{hint}")
    return FaceFolder(root, tuple(people), tuple(images), tuple(empty))


def parse_split(spec: str | float) -> tuple[int, int] | float | str:
    """'5/5' -> (5, 5) train/test images per person; '0.8' or 0.8 -> a train ratio;
    'all' -> 'all': every image trains and the check runs on the same images (tuning on a
    user's few confirmed faces, where nothing can be held out).

    Raises ConfigError for anything else (counts: train >= 1, test >= 0; ratio in (0, 1)).
    """
    fix = "use TRAIN/TEST counts per person such as 5/5, or a train ratio such as 0.8"
    text = str(spec).strip()
    if text == "all":
        return "all"
    if "/" in text:
        a, _, b = text.partition("/")
        try:
            n_train, n_test = int(a), int(b)
        except ValueError:
            raise ConfigError(
                f"split {text!r}: expected two whole numbers, got {text!r}; {fix}"
            ) from None
        if n_train < 1 or n_test < 0:
            raise ConfigError(
                f"split {text!r}: expected train >= 1 and test >= 0, got {n_train}/{n_test}; {fix}"
            )
        return n_train, n_test
    try:
        ratio = float(text)
    except ValueError:
        raise ConfigError(
            f"split {text!r}: expected counts or a ratio, got {text!r}; {fix}"
        ) from None
    if not 0.0 < ratio < 1.0:
        raise ConfigError(
            f"split {text!r}: expected a ratio strictly between 0 and 1, got {ratio}; {fix}"
        )
    return ratio


def split(folder: FaceFolder, spec: str | float, seed: int) -> Split:
    """Choose train and test images per person, the same way for the same seed.

    "a/b": a train and b test images for every person (any others are left out); a
    person with fewer than a+b images is an error. A ratio r: round(r * n) train images,
    kept within [1, n-1] so everyone is in both sets; a person with one image is an
    error (we refuse rather than silently drop people: remove the folder or use a
    split the data supports). Each person's images are shuffled by a Random seeded from
    sha256(seed, person name), so the choice ignores filesystem order and Python's hash
    seed, and adding a person does not change anyone else's split.
    """
    rule = parse_split(spec)
    if rule == "all":
        every = [
            Sample(p, label) for label, imgs in enumerate(folder.images) for p in _sorted(imgs)
        ]
        return Split(folder.people, tuple(every), tuple(every), str(spec), seed)
    need = rule[0] + rule[1] if isinstance(rule, tuple) else 2
    short = [
        (name, len(imgs))
        for name, imgs in zip(folder.people, folder.images, strict=True)
        if len(imgs) < need
    ]
    if short:
        name, n = short[0]
        more = f" (and {len(short) - 1} more people)" if len(short) > 1 else ""
        raise DataError(
            f"{folder.root / name}: expected at least {need} images for split {spec}, got "
            f"{n}{more}; add images, remove the folder, or use a smaller split"
        )
    train: list[Sample] = []
    test: list[Sample] = []
    for label, (name, imgs) in enumerate(zip(folder.people, folder.images, strict=True)):
        order = _sorted(imgs)  # the same start whatever order the caller listed them in
        _person_rng(seed, name).shuffle(order)
        if isinstance(rule, tuple):
            n_train, n_test = rule
        else:
            assert isinstance(rule, float)
            n_train = min(max(round(rule * len(order)), 1), len(order) - 1)
            n_test = len(order) - n_train
        # Sorted within each set so file order, not shuffle order, is what a reader sees.
        train.extend(Sample(p, label) for p in _sorted(order[:n_train]))
        test.extend(Sample(p, label) for p in _sorted(order[n_train : n_train + n_test]))
    return Split(folder.people, tuple(train), tuple(test), str(spec), seed)


def content_hash(folder: FaceFolder) -> str:
    """sha256 hex over every image's path (relative to the root) and bytes, in label order.

    Renaming, adding, removing or changing one byte of any image changes it; where the
    folder lives and file timestamps do not.
    """
    h = hashlib.sha256()
    for person_images in folder.images:
        for p in person_images:
            rel = p.relative_to(folder.root).as_posix().encode()
            h.update(len(rel).to_bytes(8, "little") + rel)
            with p.open("rb") as f:
                h.update(p.stat().st_size.to_bytes(8, "little"))
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def info(
    root: Path | str,
    *,
    min_images: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_progress: Progress | None = None,
) -> FolderInfo:
    """Decode every image under root and report sizes, kinds and problems.

    Problems: files that are not usable images (unreadable, truncated, too large), people
    with fewer than min_images usable images (a split needs two or more), empty person
    folders, images lying directly in root, and files in person folders that are not
    one of IMAGE_EXTENSIONS. Raises DataError when root is missing or has no person
    folders at all.
    """
    folder = scan_folder(root)
    problems: list[tuple[Path, str]] = []
    for f in _sorted(folder.root.iterdir()):
        if is_image_file(f):
            problems.append(
                (f, f"not in a person folder, so not used; move it into {folder.root}/<person>/")
            )
    sizes: Counter[tuple[int, int]] = Counter()
    grey = colour = done = 0
    counts: list[int] = []
    total = folder.num_images
    for name, imgs in zip(folder.people, folder.images, strict=True):
        usable = 0
        for p in imgs:
            try:
                img = load_image(p, mode=None, max_pixels=max_pixels)
            except DataError as e:
                problems.append((p, _without_prefix(str(e), p)))
            else:
                usable += 1
                sizes[img.size] += 1
                if img.mode == "L":
                    grey += 1
                else:
                    colour += 1
            done += 1
            if on_progress is not None:
                on_progress(done, total)
        counts.append(usable)
        person_dir = folder.root / name
        for f in _sorted(person_dir.iterdir()):
            if f.is_file() and not f.name.startswith(".") and not is_image_file(f):
                problems.append(
                    (
                        f,
                        f"not one of {', '.join(IMAGE_EXTENSIONS)}, so ignored; "
                        "convert it or move it out",
                    )
                )
        if usable < min_images:
            problems.append(
                (
                    person_dir,
                    f"has {usable} usable image{'s' * (usable != 1)}; a "
                    f"split needs at least {min_images} per person; add "
                    "images or remove the folder",
                )
            )
    for name in folder.empty:
        problems.append((folder.root / name, "has no images; add images or remove the folder"))
    by_area = sorted(sizes, key=lambda s: (s[0] * s[1], s))
    return FolderInfo(
        root=folder.root,
        people=len(folder.people),
        images=sum(counts),
        per_person=(min(counts), max(counts), float(statistics.median(counts))),
        sizes=tuple(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))),
        min_size=by_area[0] if by_area else None,
        max_size=by_area[-1] if by_area else None,
        grey=grey,
        colour=colour,
        problems=tuple(problems),
    )


def format_info(report: FolderInfo, *, top_sizes: int = 5) -> str:
    """Render a FolderInfo as aligned plain text: a summary, then one line per problem."""
    lo, hi, med = report.per_person

    def wh(s: tuple[int, int] | None) -> str:
        return "-" if s is None else f"{s[0]}x{s[1]}"

    common = ", ".join(f"{wh(s)} ({n})" for s, n in report.sizes[:top_sizes]) or "-"
    if len(report.sizes) > top_sizes:
        common += f", ... ({len(report.sizes)} sizes)"
    rows = [
        ("folder", str(report.root)),
        ("people", str(report.people)),
        ("images", f"{report.images} ({lo} to {hi} per person, median {med:g})"),
        ("grey / colour", f"{report.grey} / {report.colour}"),
        ("sizes (W x H)", f"smallest {wh(report.min_size)}, largest {wh(report.max_size)}"),
        ("most common", common),
        ("problems", str(len(report.problems)) if report.problems else "none"),
    ]
    lines = _table(rows)
    if report.problems:

        def rel(p: Path) -> str:
            try:
                return p.relative_to(report.root).as_posix() or "."
            except ValueError:
                return str(p)

        lines += [
            "",
            *_table([("path", "problem")] + [(rel(p), msg) for p, msg in report.problems]),
        ]
    return "\n".join(lines)


class FaceDataset(Dataset[tuple[Tensor, int]]):
    """Samples decoded once into memory as uint8 (N, C, H, W) at the model's input size.

    Each item is (x, label): x float32 (C, H, W) in [-1, 1] (x / 127.5 - 1), after the
    augmentation of `augment` (None or AugmentConfig.off(): none). A DataLoader fetches
    whole batches through __getitems__, so augmentation runs once per batch. Images are fitted with
    fit_image: scaled to cover size = (H, W), then centre-cropped, never stretched. Grey
    images with channels=3 are replicated; colour images with channels=1 become luma.
    `channels` and `size` are kept so a model can record its input. Augmentation draws
    from torch's global RNG: seed it (and give a DataLoader a seeded generator with
    num_workers=0) and every epoch reproduces exactly.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        people: Sequence[str],
        *,
        size: tuple[int, int] = (112, 112),
        channels: int = 1,
        augment: AugmentConfig | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        on_progress: Progress | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"FaceDataset: expected channels 1 or 3, got {channels}")
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"FaceDataset: expected size (H, W) with H, W >= 1, got {size}")
        if not samples:
            raise DataError(
                "FaceDataset: expected at least one image, got none; check the folder and the split"
            )
        bad = [s for s in samples if not 0 <= s.label < len(people)]
        if bad:
            raise ValueError(
                f"FaceDataset: expected labels in [0, {len(people)}), got "
                f"{bad[0].label} for {bad[0].path}"
            )
        self.people = tuple(people)
        self.size = (int(size[0]), int(size[1]))
        self.channels = channels
        self.augment = augment if augment is not None else AugmentConfig.off()
        self.paths = tuple(s.path for s in samples)
        H, W = self.size
        self.images = torch.empty((len(samples), channels, H, W), dtype=torch.uint8)  # (N,C,H,W)
        for i, s in enumerate(samples):
            img = load_image(s.path, "L" if channels == 1 else "RGB", max_pixels=max_pixels)
            self.images[i] = fit_image(img, self.size, channels)  # (C, H, W)
            if on_progress is not None:
                on_progress(i + 1, len(samples))
        self.labels = torch.tensor([s.label for s in samples], dtype=torch.int64)  # (N,)

    @property
    def num_classes(self) -> int:
        return len(self.people)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x, y = self.get_batch([index])
        return x[0], int(y[0])

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, int]]:
        """What a DataLoader calls for a batch: augmentation runs once for all of it."""
        x, y = self.get_batch(indices)
        return list(zip(x.unbind(0), y.tolist(), strict=True))

    def get_batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """x float32 (B, C, H, W) in [-1, 1], augmented; labels int64 (B,)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[idx].to(torch.float32).div_(255.0)  # (B, C, H, W) in [0, 1]
        x = augment_batch(x, self.augment)
        return normalize(x), self.labels[idx]


def _person_rng(seed: int, person: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\0{person}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _sorted(paths: Iterable[Path]) -> list[Path]:
    """Sort by name text: the same order on every filesystem and locale."""
    return sorted(paths, key=lambda p: p.name)


def _without_prefix(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _table(rows: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(a) for a, _ in rows)
    return [f"{a.ljust(width)}  {b}".rstrip() for a, b in rows]
