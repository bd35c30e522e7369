"""Scan a dataset folder: find images and captions, validate them, report what will train.

Layouts (see docs/dataset.md): a flat folder with ``metadata.csv`` (``filename,prompt``) or
``.txt`` sidecars, and kohya sub-folders ``<repeats>_<name>`` (the number sets how often each
image is seen per epoch; the name is the caption of images that have none). Regularization
images come from ``data.reg_data_dir`` the same way.

The scan only reads: every image's bytes once (sha256 for duplicates, then a cheap integrity
probe from the same bytes); nothing is written into the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_trainer.config import DataConfig
from lora_trainer.data.buckets import assign_bucket, bucket_resolutions
from lora_trainer.data.captions import IMAGE_EXTENSIONS, METADATA_NAME, list_images, read_captions
from lora_trainer.data.images import ImageProbe, probe_image
from lora_trainer.errors import DatasetError

PROBLEM_KINDS = ("corrupt", "too_small", "no_caption", "no_mask", "orphan_caption", "duplicate")
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
_MAX_LISTED = 5  # problems named in an error message
_MAX_WORKERS = 8
_MAX_SUMMARY_PROBLEMS = 40


@dataclass
class ImageItem:
    path: Path
    rel: str  # posix path relative to its dataset folder
    caption: str
    width: int  # after EXIF orientation
    height: int
    repeats: int
    is_reg: bool
    digest: str  # sha256 of the file bytes
    caption_source: str = "file"  # "file" (csv/sidecar), "folder" (kohya folder name), "none"
    mask: Path | None = None  # its loss mask in data.mask_dir


@dataclass
class Problem:
    path: Path
    kind: str  # one of PROBLEM_KINDS
    message: str

    def line(self, root: Path | None = None) -> str:
        shown = self.path
        if root is not None:
            try:
                shown = self.path.relative_to(root)
            except ValueError:
                pass
        return f"{self.kind:<15} {shown.as_posix()}: {self.message}"


@dataclass
class DatasetReport:
    config: DataConfig
    train_dir: Path
    reg_dir: Path | None = None
    items: list[ImageItem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    images_found: int = 0  # image files seen, valid or not

    @property
    def train_items(self) -> list[ImageItem]:
        return [i for i in self.items if not i.is_reg]

    @property
    def reg_items(self) -> list[ImageItem]:
        return [i for i in self.items if i.is_reg]

    @property
    def images_per_epoch(self) -> int:
        """Training samples per epoch (each image counted ``repeats`` times; reg images excluded)."""
        return sum(i.repeats for i in self.train_items)

    def problem_counts(self) -> dict[str, int]:
        counts = Counter(p.kind for p in self.problems)
        return {k: counts[k] for k in PROBLEM_KINDS if counts[k]}

    def bucket_of(self, item: ImageItem) -> tuple[int, int]:
        return assign_bucket(item.width, item.height, self.config)

    def enlarged(self) -> tuple[int, float]:
        """(training images enlarged by more than :data:`ENLARGE_NOTE` to cover their bucket, the
        largest factor): they train on blurred detail."""
        factors = [max(w / i.width, h / i.height) for i in self.train_items for w, h in [self.bucket_of(i)]]
        big = [f for f in factors if f > ENLARGE_NOTE]
        return len(big), max(big, default=1.0)

    def bucket_counts(self, is_reg: bool = False) -> dict[tuple[int, int], int]:
        """{(width, height): number of images} for training (or regularization) images."""
        counts = Counter(self.bucket_of(i) for i in self.items if i.is_reg == is_reg)
        return dict(sorted(counts.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0])))

    def folder_counts(self) -> dict[tuple[bool, str], tuple[int, int]]:
        """{(is_reg, top folder): (images, repeats)}; '.' is the dataset folder itself."""
        out: dict[tuple[bool, str], tuple[int, int]] = {}
        for i in self.items:
            top = i.rel.split("/")[0] if "/" in i.rel else "."
            n, _ = out.get((i.is_reg, top), (0, i.repeats))
            out[(i.is_reg, top)] = (n + 1, i.repeats)
        return out

    def summary(self) -> str:
        return format_summary(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``prepare --json`` and the UI."""
        return {
            "train_data_dir": str(self.train_dir),
            "reg_data_dir": str(self.reg_dir) if self.reg_dir else None,
            "resolution": self.config.resolution,
            "images_found": self.images_found,
            "usable_images": len(self.train_items),
            "reg_images": len(self.reg_items),
            "images_per_epoch": self.images_per_epoch,
            "problem_counts": self.problem_counts(),
            "problems": [{"path": str(p.path), "kind": p.kind, "message": p.message} for p in self.problems],
            "buckets": [{"width": w, "height": h, "count": n} for (w, h), n in self.bucket_counts().items()],
            "reg_buckets": [{"width": w, "height": h, "count": n}
                            for (w, h), n in self.bucket_counts(is_reg=True).items()],
            "items": [{"rel": i.rel, "caption": i.caption, "width": i.width, "height": i.height,
                       "repeats": i.repeats, "is_reg": i.is_reg, "bucket": list(self.bucket_of(i)),
                       "caption_source": i.caption_source, "sha256": i.digest} for i in self.items],
        }


# -- scanning ------------------------------------------------------------------------------

def _kohya_folder(rel_parts: tuple[str, ...]) -> tuple[int, str] | None:
    """(repeats, class name) from the deepest ``<repeats>_<name>`` folder above the image."""
    for part in reversed(rel_parts[:-1]):
        m = _KOHYA_FOLDER.match(part)
        if m and int(m.group(1)) >= 1:
            return int(m.group(1)), m.group(2).strip()
    return None


def _orphan_sidecars(root: Path, images: list[Path], extension: str) -> list[Path]:
    ext = extension if extension.startswith(".") else "." + extension
    if ext.lower() in IMAGE_EXTENSIONS or ext.lower() == ".csv":
        return []
    stems = {(p.parent, p.stem) for p in images}
    out = []
    for p in sorted(root.rglob(f"*{ext}")):
        if any(part.startswith(".") for part in p.relative_to(root).parts) or not p.is_file():
            continue
        if p.suffix.lower() == ext.lower() and (p.parent, p.stem) not in stems:
            out.append(p)
    return out


def _caption_problems(root: Path, images: list[Path], captions: dict[str, str], csv_path: Path,
                      extension: str) -> list[Problem]:
    rels = {p.relative_to(root).as_posix() for p in images}
    problems = [Problem(csv_path, "orphan_caption", f"row '{rel}' names no image in {root}")
                for rel in sorted(captions) if rel not in rels]
    problems += [Problem(p, "orphan_caption", f"no image named {p.stem} beside this caption file")
                 for p in _orphan_sidecars(root, images, extension)]
    return problems


def _inspect(path: Path) -> tuple[str, ImageProbe] | Problem:
    """sha256 and probe of one file (read once), or why it cannot be used. Thread-safe."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return Problem(path, "corrupt", f"cannot read the file ({e.strerror or e})")
    if not data:
        return Problem(path, "corrupt", "empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    try:
        return digest, probe_image(path, data)
    except DatasetError as e:
        return Problem(path, "corrupt", str(e).split(": ", 1)[-1])


def _inspect_all(paths: list[Path]) -> list[tuple[str, ImageProbe] | Problem]:
    # Reading, hashing and decoding release the GIL: threads overlap disk and CPU work.
    workers = min(_MAX_WORKERS, os.cpu_count() or 1, max(1, len(paths)))
    if workers == 1:
        return [_inspect(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lt-scan") as pool:
        return list(pool.map(_inspect, paths))


def _accept(path: Path, rel: str, got: tuple[str, ImageProbe] | Problem, cfg: DataConfig,
            seen: dict[str, str]) -> tuple[str, int, int] | Problem:
    """(digest, width, height) of a usable image, or the Problem that rules it out."""
    if isinstance(got, Problem):
        return got
    digest, probe = got
    if digest in seen:
        return Problem(path, "duplicate", f"same bytes as {seen[digest]}; kept that one")
    if min(probe.width, probe.height) < cfg.min_image_size:
        return Problem(path, "too_small", f"{probe.width}x{probe.height} has a side below "
                                          f"data.min_image_size={cfg.min_image_size}")
    seen[digest] = rel
    return digest, probe.width, probe.height


def _caption_for(rel_parts: tuple[str, ...], file_caption: str, cfg: DataConfig, is_reg: bool,
                 root: Path) -> tuple[str, str] | None:
    """(caption, source) for an image, or None when it has no caption at all."""
    if file_caption.strip():
        return file_caption.strip(), "file"
    kohya = _kohya_folder(rel_parts)
    if kohya and kohya[1]:
        return kohya[1], "folder"
    if is_reg:
        # Class images: the folder's name is the class ("dog" for reg/dog/*.png, or for images
        # directly in a reg folder named "1_dog"). A bare root name like "reg" is no class.
        root_kohya = _KOHYA_FOLDER.match(root.name)
        name = rel_parts[-2] if len(rel_parts) > 1 else (root_kohya.group(2) if root_kohya else "")
        if name.strip():
            return name.replace("_", " ").strip(), "folder"
        return None
    if cfg.trigger_word.strip():
        return "", "none"  # the trigger word alone becomes the caption (process_caption adds it)
    return None


def _mask_of(rel: str, masks: dict[str, Path]) -> Path | None:
    """The mask of the image at ``rel``: one of the same path in the mask folder (any image
    extension), else one of the same name at its top (kohya's flat conditioning_data_dir)."""
    stem = rel.rsplit(".", 1)[0]
    return masks.get(stem) or masks.get(stem.rsplit("/", 1)[-1])


def _masks_in(folder: Path) -> dict[str, Path]:
    """{path without extension, relative to ``folder``: mask image}."""
    return {p.relative_to(folder).with_suffix("").as_posix(): p for p in list_images(folder)}


def _scan_folder(report: DatasetReport, root: Path, *, is_reg: bool, metadata_path: str | None,
                 seen: dict[str, str], masks: dict[str, Path] | None = None) -> None:
    cfg = report.config
    images = list_images(root)
    if cfg.mask_dir:  # a mask folder inside the dataset: its masks are not training images
        mask_root = Path(cfg.mask_dir).expanduser().resolve()
        images = [p for p in images if mask_root not in p.resolve().parents]
    report.images_found += len(images)
    captions = read_captions(root, metadata_path, cfg.caption_extension)
    csv_path = Path(metadata_path) if metadata_path else root / METADATA_NAME
    report.problems += _caption_problems(root, images, captions, csv_path, cfg.caption_extension)
    prefix = "reg:" if is_reg else ""
    for path, inspected in zip(images, _inspect_all(images), strict=True):
        rel = path.relative_to(root).as_posix()
        got = _accept(path, prefix + rel, inspected, cfg, seen)
        if isinstance(got, Problem):
            report.problems.append(got)
            continue
        digest, width, height = got
        parts = tuple(rel.split("/"))
        caption = _caption_for(parts, captions.get(rel, ""), cfg, is_reg, root)
        if caption is None:
            report.problems.append(Problem(path, "no_caption", f"no caption in {csv_path.name} or "
                                           f"{path.stem}{cfg.caption_extension}; add one or set data.trigger_word"))
            continue
        mask = _mask_of(rel, masks) if masks is not None else None
        if masks is not None and mask is None:
            report.problems.append(Problem(path, "no_mask", f"no mask named {path.stem}.* in {cfg.mask_dir}; add "
                                           "one (white trains, black does not)"))
            continue
        kohya = _kohya_folder(parts)
        repeats = kohya[0] if kohya else cfg.repeats
        report.items.append(ImageItem(path=path, rel=rel, caption=caption[0], width=width, height=height,
                                      repeats=repeats, is_reg=is_reg, digest=digest, caption_source=caption[1],
                                      mask=mask))


def check_folder(value: str | None, key: str) -> Path:
    """The folder a config key names, or DatasetError (empty, missing, a file)."""
    if not value or not str(value).strip():
        raise DatasetError(f"{key} is empty; set it to the folder of your training images")
    path = Path(value).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DatasetError(f"{key}: {path} {what}; set it to the folder of your images")
    return path


def build_report(data_cfg: DataConfig) -> DatasetReport:
    """Scan and validate without deciding: every problem is recorded, nothing is raised for them.

    Raises DatasetError only when a folder cannot be used at all (missing, unreadable CSV).
    """
    train_dir = check_folder(data_cfg.train_data_dir, "data.train_data_dir")
    reg_dir = check_folder(data_cfg.reg_data_dir, "data.reg_data_dir") if data_cfg.reg_data_dir else None
    report = DatasetReport(config=data_cfg, train_dir=train_dir, reg_dir=reg_dir)
    masks = _masks_in(check_folder(data_cfg.mask_dir, "data.mask_dir")) if data_cfg.mask_dir else None
    seen: dict[str, str] = {}
    _scan_folder(report, train_dir, is_reg=False, metadata_path=data_cfg.metadata_path, seen=seen, masks=masks)
    if reg_dir is not None:
        _scan_folder(report, reg_dir, is_reg=True, metadata_path=None, seen=seen)
    return report


# What to do about the images a kind of problem leaves out
FIXES = {
    "corrupt": "replace or re-save them",
    "too_small": "use larger images or lower data.min_image_size",
    "no_caption": "caption them with the 'caption' command or in the tab's Captions section, or set "
                  "data.trigger_word to use it as their caption",
    "no_mask": "add a mask image of the same name to data.mask_dir",
}


def unusable_summary(report: DatasetReport) -> str:
    """Each kind of problem with its count and fix: "6 no caption, caption them ..."."""
    return "; ".join(f"{n} {kind.replace('_', ' ')}" + (f", {FIXES[kind]}" if kind in FIXES else "")
                     for kind, n in report.problem_counts().items())


def check_report(report: DatasetReport) -> None:
    """Raise DatasetError when nothing can train, or when on_invalid is 'stop' and there are problems."""
    cfg = report.config
    if report.problems and cfg.on_invalid == "stop":
        listed = "; ".join(f"{p.path.name} ({p.kind})" for p in report.problems[:_MAX_LISTED])
        more = f" and {len(report.problems) - _MAX_LISTED} more" if len(report.problems) > _MAX_LISTED else ""
        raise DatasetError(f"{report.train_dir}: {len(report.problems)} invalid file(s): {listed}{more}; "
                           "fix or remove them, or set data.on_invalid: skip")
    if not report.train_items:
        if report.images_found == 0:
            exts = ", ".join(IMAGE_EXTENSIONS)
            raise DatasetError(f"data.train_data_dir: no images ({exts}) in {report.train_dir}; "
                               "put your training images there")
        raise DatasetError(f"data.train_data_dir: none of the {report.images_found} images in "
                           f"{report.train_dir} can be used: {unusable_summary(report)} ('prepare' and the tab's "
                           "Dataset section list each file)")
    if report.reg_dir is not None and not report.reg_items:
        raise DatasetError(f"data.reg_data_dir: no usable images in {report.reg_dir}; "
                           "add class images or clear data.reg_data_dir")


# An image enlarged by more than this to cover its bucket is named in the summary.
ENLARGE_NOTE = 1.1


def scan_dataset(data_cfg: DataConfig) -> DatasetReport:
    """Scan, validate and decide: the report of a dataset that can train, or DatasetError."""
    report = build_report(data_cfg)
    check_report(report)
    return report


# -- summary -------------------------------------------------------------------------------

def format_summary(report: DatasetReport) -> str:
    cfg = report.config
    train = report.train_items
    lines = [f"dataset {report.train_dir}",
             f"  images: {report.images_found} found, {len(train)} usable, "
             f"{report.images_per_epoch} samples per epoch with repeats"]
    for (is_reg, top), (n, repeats) in sorted(report.folder_counts().items()):
        kind = "reg " if is_reg else ""
        shown = "(top level)" if top == "." else top
        lines.append(f"    {kind}{shown}: {n} image(s) x {repeats} repeat(s)")
    if report.reg_dir is not None:
        lines.append(f"  regularization: {report.reg_dir}: {len(report.reg_items)} usable image(s)")
    sources = Counter(i.caption_source for i in train)
    lines.append(f"  captions: {sources['file']} from files, {sources['folder']} from folder names, "
                 f"{sources['none']} trigger word only")
    counts = report.problem_counts()
    action = "stop" if cfg.on_invalid == "stop" else "skipped"
    lines.append("  problems: " + (", ".join(f"{k} {n}" for k, n in counts.items()) + f" ({action})"
                                   if counts else "none"))
    for p in report.problems[:_MAX_SUMMARY_PROBLEMS]:
        root = report.reg_dir if report.reg_dir and p.path.is_relative_to(report.reg_dir) else report.train_dir
        lines.append("    " + p.line(root))
    if len(report.problems) > _MAX_SUMMARY_PROBLEMS:
        lines.append(f"    ... and {len(report.problems) - _MAX_SUMMARY_PROBLEMS} more ('prepare --json' lists all)")
    mode = "buckets" if cfg.enable_buckets else "square crop"
    upscale = ", no upscale" if cfg.bucket_no_upscale else ""
    lines.append(f"  {mode} at resolution {cfg.resolution}{upscale} (width x height: images)")
    if cfg.enable_buckets and not cfg.bucket_no_upscale and len(
            bucket_resolutions(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_step)) == 1:
        lines.append(f"    (only one bucket: lower data.min_bucket_reso below {cfg.resolution} for aspect buckets)")
    for is_reg in (False, True):
        for (w, h), n in report.bucket_counts(is_reg).items():
            lines.append(f"    {'reg ' if is_reg else ''}{w}x{h}: {n}")
    note = enlarged_note(report)
    if note:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def enlarged_note(report: DatasetReport) -> str:
    """What to say of the training images enlarged to cover their bucket ("" for none)."""
    enlarged, factor = report.enlarged()
    if not enlarged:
        return ""
    return (f"{enlarged} image(s) are smaller than their bucket and are enlarged (up to {factor:.1f}x), which "
            "trains on blurred detail; use larger images, a lower data.resolution, or data.bucket_no_upscale: true")
