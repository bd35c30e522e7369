"""What the tab's buttons do, without gradio: plain values in, plain values out (tested directly).

Dataset scanning, caption table load/save and tag tools, progress formatting and the test
render. The tab (tab.py) only wires these to components.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer.config import TrainConfig, build_config, load_config
from lora_trainer.errors import ConfigError, DatasetError, HostError

if TYPE_CHECKING:
    from lora_trainer.hosts.base import Host

Rows = list[list[str]]
log = logging.getLogger(__name__)


# -- dataset ---------------------------------------------------------------------------------

def import_uploads(paths: Sequence[str], folder: str | Path) -> list[Path]:
    """Copy uploaded files into ``folder`` (created); an existing name gets a ``_1``, ``_2`` suffix."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in map(Path, paths):
        dest = folder / src.name
        n = 1
        while dest.exists():
            dest = folder / f"{src.stem}_{n}{src.suffix}"
            n += 1
        shutil.copy2(src, dest)
        out.append(dest)
    return out


def upload_folder(cfg: TrainConfig) -> Path:
    """Where dropped files go: the form's dataset folder, or without one a new folder named after
    the LoRA, ``<output_dir>/datasets/<output_name>`` (as an absolute path, for the form)."""
    from lora_trainer.lora.files import sanitize_name

    if cfg.data.train_data_dir:
        return Path(cfg.data.train_data_dir).expanduser()
    return (Path(cfg.output.output_dir).expanduser() / "datasets" / sanitize_name(cfg.output.output_name)).absolute()


def scan(folder: str, cfg: TrainConfig) -> dict[str, Any]:
    """Scan ``folder`` with the config's data settings; never raises for bad files (they are listed).

    Returns gallery items ``(path, label)``, problem rows ``[file, kind, message]``, bucket rows
    ``[bucket, images]`` and a one-paragraph summary.
    """
    from lora_trainer.data.captions import IMAGE_EXTENSIONS
    from lora_trainer.data.scan import build_report, enlarged_note

    if not folder or not Path(folder).is_dir():
        raise DatasetError(f"{folder or '(empty)'}: not a folder; enter the folder of your training images")
    data_cfg = _listing_config(folder, cfg)
    # build_report lists every problem without raising (scan_dataset stops when nothing is
    # trainable yet, e.g. before captioning, which is exactly when the user needs this view)
    report = build_report(data_cfg)
    problems_by_path: dict[str, list[str]] = collections.defaultdict(list)
    for p in report.problems:
        problems_by_path[str(p.path)].append(p.kind)
    gallery: list[tuple[str, str]] = []
    for item in report.items:
        flags = problems_by_path.pop(str(item.path), [])
        label = f"{item.rel} ({item.width}x{item.height})" + (f" [{', '.join(flags)}]" if flags else "")
        reg = " (regularization)" if item.is_reg else ""
        gallery.append((str(item.path), f"{label}{reg}: {item.caption}"))
    for path, kinds in problems_by_path.items():  # skipped files that can still be shown
        if Path(path).suffix.lower() in IMAGE_EXTENSIONS and "corrupt" not in kinds:
            gallery.append((path, f"{Path(path).name} [{', '.join(kinds)}] (skipped)"))
    rows = [[_rel(p.path, folder), p.kind, p.message] for p in report.problems]
    counts = collections.Counter(p.kind for p in report.problems)
    summary = (f"**{len(report.train_items)} images** ready to train ({report.images_per_epoch} per epoch with repeats)"
               + ("; problems: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(counts.items())) if counts else "")
               + ".")
    if report.images_found == 0:
        summary = (f"**No images** ({', '.join(IMAGE_EXTENSIONS)}) in {report.train_dir}: put your training "
                   "images there, or drop them into the box above.")
    elif counts["no_caption"]:
        summary += (f"\n\n{counts['no_caption']} without a caption: caption them in the Captions section, or "
                    "enter a trigger word there to use it as their caption.")
    note = enlarged_note(report)
    if note:
        summary += f"\n\n{note}."
    buckets = [[f"{w}x{h}", str(n)] for (w, h), n in report.bucket_counts().items()]
    return {"gallery": gallery, "problems": rows, "buckets": buckets, "summary": summary,
            "sample_prompt": sample_prompt_of(report)}


def sample_gallery(samples: list[tuple[int, Any]]) -> list[tuple[Any, str]]:
    """The Samples gallery: each image captioned with its step, and with its prompt's number
    where a step has samples of several prompts (they come in the prompts' order)."""
    per_step = collections.Counter(step for step, _ in samples)
    seen: collections.Counter[int] = collections.Counter()
    out = []
    for step, img in samples:
        seen[step] += 1
        out.append((img, f"step {step}" + (f", prompt {seen[step]}" if per_step[step] > 1 else "")))
    return out


def sample_prompt_of(report: Any) -> tuple[str, str] | None:
    """``(image, prompt)``: the caption the dataset's first training image trains with (trigger
    word, caption prefix/suffix added, separators written out; no shuffle or dropout; with
    wildcards on, its first line and the first option of each ``{a|b}``), as a prompt for samples
    that show what the LoRA learned; None when no image has a caption yet."""
    from lora_trainer.data.text import caption_options, expand_wildcards, process_caption

    options = caption_options(report.config)
    for item in report.train_items:
        caption = expand_wildcards(item.caption) if options["enable_wildcard"] else item.caption
        prompt = process_caption(caption, report.config.trigger_word, **options)
        if prompt:
            return item.rel, prompt
    return None


def dataset_sample_prompt(folder: str, cfg: TrainConfig) -> tuple[str, str] | None:
    """:func:`sample_prompt_of` the dataset in ``folder`` as the config's data settings read it."""
    from lora_trainer.data.scan import build_report

    if not folder or not Path(folder).is_dir():
        return None
    return sample_prompt_of(build_report(_listing_config(folder, cfg)))


def _listing_config(folder: str, cfg: TrainConfig) -> Any:
    """The config's data settings for ``folder``, listing bad files instead of stopping at one."""
    return build_config({"data.train_data_dir": folder, "data.on_invalid": "skip"}, base=cfg).data


def offered_sample_prompt(cfg: TrainConfig, offered: bool, found: tuple[str, str] | None) -> tuple[str, str] | None:
    """``(prompt, line)`` when the form's sample prompt should become ``found``'s: the form has
    none and the page has not filled it before (a prompt the user cleared stays cleared)."""
    if offered or cfg.sample.prompt.strip() or found is None:
        return None
    image, prompt = found
    return prompt, (f"The sample prompt (Train) is now the caption of {image}: '{prompt}'. Samples of it show what "
                    "the LoRA learns: one at the end of the run, the LoRA's preview card, and one every "
                    "'every n steps'; edit it, or clear it for none.")


BUCKET_FIELDS = ["data.resolution", "data.enable_buckets", "data.min_bucket_reso", "data.max_bucket_reso",
                 "data.bucket_step", "data.bucket_no_upscale"]


def bucket_settings(cfg: TrainConfig) -> list[Any]:
    """What the bucket preview depends on besides the images (resolution first)."""
    return [cfg.get(path) for path in BUCKET_FIELDS]


def _rel(path: Any, folder: str) -> str:
    try:
        return Path(path).relative_to(folder).as_posix()
    except ValueError:
        return str(path)


# -- captions --------------------------------------------------------------------------------

def image_names(folder: str) -> list[str]:
    """The images in ``folder`` as the caption table names them (relative, forward slashes)."""
    from lora_trainer.data.captions import list_images

    return [p.relative_to(folder).as_posix() for p in list_images(Path(folder))]


def load_caption_rows(folder: str, cfg: TrainConfig) -> Rows:
    """``[[relative file, caption]]`` for every image in ``folder`` (empty caption when none)."""
    from lora_trainer.data.captions import read_captions

    captions = read_captions(Path(folder), cfg.data.metadata_path, cfg.data.caption_extension)
    return [[rel, captions.get(rel, "")] for rel in image_names(folder)]


def normalize_rows(table: Any) -> Rows:
    """Rows from a Dataframe value (list of lists, or a pandas frame on some gradio versions)."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):
        table = table.values.tolist()
    out = []
    for row in table:
        if not row or not str(row[0]).strip():
            continue
        out.append([str(row[0]).strip(), "" if len(row) < 2 or row[1] is None else str(row[1])])
    return out


def caption_format(folder: str, cfg: TrainConfig, choice: str) -> str:
    """"auto": keep the layout the folder already uses (metadata.csv if present, else .txt sidecars)."""
    if choice != "auto":
        return choice
    if cfg.data.metadata_path or (Path(folder) / "metadata.csv").is_file():
        return "csv"
    return "txt"


def save_caption_rows(folder: str, rows: Rows, cfg: TrainConfig, fmt: str = "auto") -> str:
    """Write the table atomically (the replaced file is backed up first); a one-line report."""
    from lora_trainer.data.captions import write_captions

    if not rows:
        raise DatasetError("the caption table is empty; load a dataset first")
    # a row the user added or a file name they edited would write a caption for no image (with
    # .txt files: a stray file, outside the folder for "" or "../x"): nothing is written then
    images = set(image_names(folder))
    strays = [r[0] for r in rows if r[0] not in images]
    if strays:
        raise DatasetError(f"caption table: {strays[0]!r} is not an image in {folder}"
                           + (f" (and {len(strays) - 1} more)" if len(strays) > 1 else "")
                           + "; the file column names the images: fix it or press Reload from disk")
    fmt = caption_format(folder, cfg, fmt)
    backups = write_captions(folder, {r[0]: r[1] for r in rows}, fmt=fmt,
                             metadata_path=cfg.data.metadata_path, extension=cfg.data.caption_extension)
    return f"saved {len(rows)} captions as {fmt}" + (f" ({len(backups)} backup(s) in .backup)" if backups else "")


# Tag tools work on the table being edited (unsaved), through caption.tags' pure functions.
def _as_dict(rows: Rows) -> dict[str, str]:
    return {rel: caption for rel, caption in rows}


def _as_rows(rows: Rows, captions: dict[str, str]) -> Rows:
    return [[rel, captions[rel]] for rel, _ in rows]


def add_trigger(rows: Rows, trigger: str) -> Rows:
    from lora_trainer.caption import tags

    if not trigger.strip():
        return rows
    return _as_rows(rows, tags.add_trigger(_as_dict(rows), trigger))


def find_replace(rows: Rows, find: str, replace: str, regex: bool = False, whole_tag: bool = False) -> tuple[Rows, int]:
    """Replace in every caption; returns the rows and how many captions changed."""
    from lora_trainer.caption import tags

    before = _as_dict(rows)
    after = tags.find_replace(before, find, replace, regex=regex, whole_tag=whole_tag)
    return _as_rows(rows, after), len(tags.changed(before, after))


def tag_frequencies(rows: Rows) -> Rows:
    from lora_trainer.caption import tags

    return [[tag, str(n)] for tag, n in tags.tag_frequency(_as_dict(rows))]


def caption_folder(folder: str, model: str, mode: str, fmt: str, cfg: TrainConfig, captioner: Any = None,
                   progress: Callable[[int, int], None] | None = None) -> Any:
    """Caption the folder's images with BLIP / CLIP / both and write the captions (backed up).

    ``captioner`` is an already loaded BLIP-like model (``caption(images) -> list[str]``), e.g.
    the WebUI's own; without one the caption package loads BLIP from the local cache.
    """
    from lora_trainer.caption.run import caption_folder as run

    return run(folder, model=model, fmt=caption_format(folder, cfg, fmt), trigger=cfg.data.trigger_word or None,
               mode=mode, progress=(lambda d, t, *_: progress(d, t)) if progress else None, captioner=captioner,
               metadata_path=cfg.data.metadata_path, extension=cfg.data.caption_extension)


def caption_error_text(e: Exception, model: str) -> str:
    """The captioning error for the page: a missing model says what to do here, not which
    command-line option to pass (the tab has no such field)."""
    from lora_trainer.errors import ModelMissingError

    if not isinstance(e, ModelMissingError):
        from lora_trainer.ui.context import err_text

        return err_text(e)
    other = "clip" if model == "blip" else "blip"
    return (f"⚠ {e.message}, then press Caption images again. Or choose '{other}' in 'Caption with', "
            "or type the captions into the table below and press Save captions.")


# -- training progress -----------------------------------------------------------------------

def fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    s = int(round(s))
    # hours as "3h 05m": "3:05:00" reads like a clock time next to a progress bar
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


FINAL_STATUSES = ("done", "stopped", "finished", "error")


def progress_html(snap: dict[str, Any] | None, prefix: str = "lt-") -> str:
    """The progress line: status, step of total, speed; an ETA only while the run is training."""
    if not snap:
        return f"<div class='{prefix}progress'><span class='{prefix}status'>idle</span></div>"
    status = snap.get("status")
    if status == "idle" and snap.get("alive"):
        status = "starting…"  # the worker is loading the model and data; no event yet
    # before the first step (or after an early error) the total is the configured max steps
    total = snap.get("total_steps") or snap.get("max_train_steps") or 0
    step = snap.get("step") or 0
    pct = 100.0 * step / total if total else 0.0
    ips = snap.get("it_per_s")
    text = f"{status} · step {step}/{total or '?'}" + (f" · {ips:.2f} it/s" if ips else "")
    if status == "running" and not step and snap.get("phase"):
        text += f" · {snap['phase']}"  # loading, caching, or waiting for the model: no ETA yet
    elif status == "running":
        text += f" · ETA {fmt_seconds(snap.get('eta_s'))}"
    if snap.get("error"):
        text += f" · {snap['error']}"
    return (f"<div class='{prefix}progress' data-status='{snap.get('status')}'>"
            f"<div class='{prefix}progress-bar' style='width:{pct:.1f}%'></div>"
            f"<span class='{prefix}progress-text'>{_html_escape(text)}</span></div>")


def outcome_text(snap: dict[str, Any]) -> str:
    """One line on how a run ended, for the message under the Start button."""
    status, step, path = snap.get("status"), snap.get("step") or 0, snap.get("output_path")
    if status == "error":
        return f"⚠ the run failed: {snap.get('error') or 'see the log'}"
    if status == "stopped" and not step and not path:
        return "stopped before the first step; nothing was written"
    if status in ("done", "stopped"):
        where = f"; LoRA written to {path}" if path else ""
        go_on = f"; Continue trains on from step {step}" if continuable(snap) else ""
        return f"{'done' if status == 'done' else 'stopped'} at step {step}{where}{go_on}"
    return "the run ended without a result; see the log"


def continuable(snap: dict[str, Any] | None) -> bool:
    """A run stopped part-way that saved a checkpoint: Continue can take it on from there."""
    if not snap or snap.get("status") != "stopped" or not snap.get("checkpoints"):
        return False
    return 0 < (snap.get("step") or 0) < (snap.get("total_steps") or 0)


def continue_stopped(host: Host, output_dir: str | Path | None = None) -> tuple[Any, str]:
    """Start the stopped run again from its newest checkpoint, with the settings it started with
    (not the form's: a resume must keep them); (the new job, what to tell the user). With no
    stopped run in this process (the WebUI was restarted, or closed mid-run), the newest
    unfinished run with a checkpoint in ``output_dir``."""
    from lora_trainer import jobs

    job = jobs.current()
    snap = job.snapshot() if job is not None else None
    if job is not None and not job.alive and continuable(snap):
        cfg, step = build_config({"train.resume": "latest"}, base=job.config), snap["step"]
    elif (found := unfinished_run(output_dir)) is not None and (job is None or not job.alive):
        used = load_config(found.checkpoint / "config.yaml")
        cfg, step = build_config({"train.resume": str(found.checkpoint)}, base=used), found.step
    else:
        raise ConfigError("there is no stopped run to continue; press Start training")
    loaded = host.loaded_model()
    if loaded is not None:
        loaded.require_trainable()
    return jobs.start(cfg, host), (f"continuing '{cfg.output.output_name}' from step {step} with the "
                                   "settings it started with")


def unfinished_run(output_dir: str | Path | None) -> Any:
    """The newest run in ``output_dir`` that stopped, crashed or was closed before its last step
    (``checkpoint.Unfinished``), or None; None too for a folder that cannot be read (what the page
    asks on load and when the output folder field is left must never fail; Start says what is
    wrong with the folder)."""
    from lora_trainer.train.checkpoint import unfinished_runs

    try:
        found = unfinished_runs(output_dir) if output_dir else []
    except OSError as e:
        log.warning("cannot look for unfinished runs in %s: %s", output_dir, e)
        return None
    return found[0] if found else None


RUN_FOLDER_FILE = "last_run_folder.txt"


def remember_run_folder(default_dir: str | Path, run_dir: str | Path) -> None:
    """A run started in another folder than the default output folder is named in the default
    folder's ``last_run_folder.txt``, so the page after a restart finds it there
    (:func:`runs_folder`); a run in the default folder removes that note."""
    from lora_trainer.fsutil import atomic_write_text

    note, run = Path(default_dir) / RUN_FOLDER_FILE, Path(run_dir).absolute()
    if run == Path(default_dir).absolute():
        note.unlink(missing_ok=True)
    else:
        atomic_write_text(note, f"{run}\n")


def runs_folder(default_dir: str | Path) -> str:
    """The folder a page after a restart looks for the last run in: the one the default output
    folder's ``last_run_folder.txt`` names while it is a folder, else the default folder."""
    try:
        named = (Path(default_dir) / RUN_FOLDER_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return str(default_dir)
    return named if named and Path(named).is_dir() else str(default_dir)


def last_run(output_dir: str | Path | None) -> tuple[TrainConfig, str] | None:
    """The settings of the latest run started in ``output_dir`` and a line that says whose they
    are, for a page loaded after a restart; None when there was none there or its config cannot be
    read. Its config.yaml counts only when the run's logs folder keeps the same file (a config
    of the user's in that folder is not a run's)."""
    from lora_trainer.train.outputs import run_config_copies

    if not output_dir:
        return None
    path = Path(output_dir) / "config.yaml"
    try:
        if not path.is_file() or not run_config_copies(Path(output_dir), path.read_text(encoding="utf-8")):
            return None
        cfg = load_config(path)
        started = _local_time(path.stat().st_mtime)
    except Exception as e:  # noqa: BLE001 - an older release's or a damaged file: the form keeps its defaults
        log.warning("the last run's settings in %s cannot be shown: %s", path, e)
        return None
    return cfg, (f"the form holds the settings of the last run, '{cfg.output.output_name}' (started {started}); "
                 "Start training begins a new run with them")


UNFINISHED_PREFIX = "an unfinished run: "


def unfinished_text(found: Any) -> str:
    saved = _local_time(found.saved_at)
    return (f"{UNFINISHED_PREFIX}'{found.name}' at step {found.step} of {found.total_steps} (checkpoint of {saved}); "
            "Continue takes it on from there")


def _local_time(timestamp: float) -> str:
    """A file's time as the page shows it: local, to the minute."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def loss_frame(losses: Sequence[tuple[int, float]], smoothing: float = 0.9) -> Any:
    """Long-format frame (step, loss, series) with the raw loss and its bias-corrected EMA."""
    import pandas as pd

    rows: list[tuple[int, float, str]] = []
    ema, n = 0.0, 0
    for step, loss in losses:
        rows.append((int(step), float(loss), "raw"))
        n += 1
        ema = smoothing * ema + (1 - smoothing) * float(loss)
        rows.append((int(step), ema / (1 - smoothing ** n), "smoothed"))
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def loss_frames(losses: Sequence[tuple[int, float]], smoothing: float = 0.9) -> tuple[Any, Any]:
    """(raw, smoothed) frames with columns step, loss: one per plot."""
    frame = loss_frame(losses, smoothing)
    parts = [frame[frame.series == name][["step", "loss"]].reset_index(drop=True) for name in ("raw", "smoothed")]
    return parts[0], parts[1]


# -- test render -----------------------------------------------------------------------------

_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([-0-9.]+))?>")


def parse_weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in re.split(r"[,\s]+", text.strip()) if w]
    except ValueError:
        raise DatasetError(f"weights {text!r}: expected numbers separated by commas, e.g. 0, 0.5, 0.7, 1") from None
    if not weights:
        raise DatasetError("weights: give at least one weight, e.g. 0, 0.5, 0.7, 1")
    return weights


def lora_tag(name: str, weight: float = 0.7) -> str:
    return f"<lora:{name}:{weight:g}>" if name else ""


def list_loras(folder: str | Path) -> list[str]:
    """LoRA names (file stems) in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.stem for p in files]


def model_busy() -> HostError:
    """The one refusal of a render while a training run holds the model; it names the run when
    this process started it."""
    from lora_trainer import jobs

    running = jobs.current()
    who = (f"training run '{running.config.output.output_name}'" if running is not None and running.alive
           else "a training run")
    return HostError(f"{who} is using the model; render when it ends, or press Stop in the Train section")


def render_sweep(host: Host, prompt: str, negative_prompt: str, seed: int, lora_name: str,
                 weights: list[float], steps: int, width: int, height: int) -> list[tuple[Any, str]]:
    """One image per weight, side by side, labelled; the LoRA name may also come from the prompt."""
    from lora_trainer import jobs

    m = _LORA_TAG.search(prompt or "")
    name = lora_name or (m.group(1) if m else "")
    if not name:
        raise DatasetError("choose a LoRA to test (or put `<lora:name:1>` in the prompt)")
    if (running := jobs.current()) is not None and running.alive:
        # it holds the model (and a WebUI's queue) until it ends: the render would wait that long, silently
        raise model_busy()
    clean = _LORA_TAG.sub("", prompt or "").strip(" ,")
    images = host.render(clean, negative_prompt or "", int(seed), name, list(weights), int(steps), int(width), int(height))
    return [(img, f"{name} @ {w:g}") for img, w in zip(images, weights, strict=True)]
