"""The Train LoRA tab: Dataset, Captions, Train, Test. Host-agnostic (A1111, Forge, standalone).

Settings live in a ``{field_path: component}`` map built from TrainConfig's fields; handlers
receive their values in the order of ``paths`` and rebuild a TrainConfig by name. Training runs
in the job registry's worker thread; a timer polls its snapshot, so a reloaded page shows it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lora_trainer import jobs
from lora_trainer.config import TrainConfig, build_config
from lora_trainer.ui import compat, handlers
from lora_trainer.ui.context import TabContext, err_text
from lora_trainer.ui.fields import UI_FIELDS
from lora_trainer.ui.train_section import (
    auto_form,
    form_of,
    form_outputs,
    lora_dir_of,
    runs_folder_of,
    test_section,
    train_section,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from lora_trainer.caption.blip import Captioner
    from lora_trainer.hosts.base import Host


def build_tab(host: Host, *, elem_prefix: str = "lt-", captioner: Captioner | None = None,
              defaults: TrainConfig | None = None, remember_last_run: bool = False,
              start_auto: bool = False) -> Any:
    """The whole tab as a ``gr.Blocks`` (the WebUI puts it in a tab; the app launches it).
    ``remember_last_run``: a page loaded after a restart shows the settings of the last run in
    the default output folder rather than the defaults (the WebUI's tab; the app's defaults are
    its command line's). ``start_auto``: a page with no run to show (a first visit) starts from
    the "auto" preset, sized for the loaded model and the GPU's free memory at that moment."""
    g = compat.gr()
    ctx = TabContext(host=host, prefix=elem_prefix, captioner=captioner, defaults=defaults or TrainConfig(),
                     remember_last_run=remember_last_run, start_auto=start_auto)
    default_dir = ctx.defaults.output.output_dir  # a WebUI's runs (tab, API) are found after a restart
    jobs.on_start("the tab's run folder", (lambda cfg: handlers.remember_run_folder(default_dir, cfg.output.output_dir))
                  if remember_last_run else None)
    with g.Blocks(analytics_enabled=False, elem_id=ctx.eid("root")) as tab:
        with g.Tabs(elem_id=ctx.eid("sections")):
            with g.Tab("Dataset", elem_id=ctx.eid("tab-dataset")):
                _dataset_section(ctx)
            with g.Tab("Captions", elem_id=ctx.eid("tab-captions")):
                _captions_section(ctx)
            with g.Tab("Train", elem_id=ctx.eid("tab-train")):
                train_section(ctx, tab)
            with g.Tab("Test", elem_id=ctx.eid("tab-test")):
                test_section(ctx)
        _check_field_map(ctx)
        for wire in ctx.deferred:
            wire()
        _on_page_load(ctx, tab)
    tab.lt_context = ctx  # for hosts and tests: the field map and the defaults
    return tab


def _on_page_load(ctx: TabContext, tab: Any) -> None:
    """A (re)loaded page shows the form of the run its progress shows, that run's LoRA folder in
    the Test list, and the captions of the form's dataset folder. With no run in this process
    (the WebUI was restarted), the last run's settings where the tab remembers them, and a line
    that says so unless the page's first poll offers an unfinished run there instead. With no run
    at all (a first visit), the "auto" preset where the tab starts from it, and what it picked.
    The preset dropdown names the preset the form's values are, or "custom"."""

    def restore() -> list[Any]:
        keep = compat.update()
        job = jobs.current()
        if job is not None:
            names = handlers.list_loras(lora_dir_of(ctx, job.config))
            return [*form_of(ctx, job.config), compat.update(choices=names, value=names[0] if names else None), keep]
        out = runs_folder_of(ctx)
        last = handlers.last_run(out) if ctx.remember_last_run else None
        if last is not None:
            cfg, said = last
            return [*form_of(ctx, cfg), keep, keep if handlers.unfinished_run(out) is not None else said]
        if ctx.start_auto:  # a first visit: sized for the loaded model and the card, and said so
            form, note = auto_form(ctx)
            # "auto" said, not kept: a WebUI may have put another default on the dropdown (ui-config.json)
            return [*form, "auto", keep, keep if handlers.unfinished_run(out) is not None else note]
        return [keep for _ in range(len(ctx.paths) + 3)]

    reload_captions, caption_outputs = ctx.parts["caption_reload"]
    tab.load(restore, None, [*form_outputs(ctx), ctx.parts["test_lora"], ctx.parts["train_msg"]]).then(
        reload_captions, ctx.inputs, caption_outputs)


def _check_field_map(ctx: TabContext) -> None:
    missing = [p for p in UI_FIELDS if p not in ctx.fields]
    if missing:
        raise RuntimeError(f"Train LoRA tab: no component for config fields {missing}")


# -- Dataset -------------------------------------------------------------------------------

def _dataset_section(ctx: TabContext) -> None:
    g = compat.gr()
    with g.Row():
        folder = ctx.field("data.train_data_dir", scale=4)
        load = g.Button("Load dataset", variant="primary", elem_id=ctx.eid("load-dataset"), scale=1)
    upload = g.File(label="Drop images (and their .txt captions) here: they are copied into the folder above, "
                          "or without one into a new folder named after the LoRA",
                    file_count="multiple", file_types=["image", ".txt", ".csv"], elem_id=ctx.eid("upload"))
    summary = g.Markdown(elem_id=ctx.eid("dataset-summary"))
    gallery = compat.gallery(label="Images (caption and problems)", columns=6, height=420,
                             elem_id=ctx.eid("dataset-gallery"))
    with g.Row():
        problems = compat.dataframe(headers=["file", "problem", "details"], label="Validation problems",
                                    interactive=False, height=220, elem_id=ctx.eid("problems"))
        buckets = compat.dataframe(headers=["bucket (w x h)", "images"], label="Bucket preview",
                                   interactive=False, height=220, elem_id=ctx.eid("buckets"))

    shown = g.State(None)  # the settings the bucket preview was computed with
    offered = g.State(False)  # the page filled the empty sample prompt from the dataset once
    ctx.parts["prompt_offered"] = offered

    def scan_outputs(cfg: TrainConfig, was_offered: bool, test_prompt: str, said: str = "") -> tuple[Any, ...]:
        res = handlers.scan(cfg.data.train_data_dir, cfg)
        prompt, line = _prompt_updates(cfg, was_offered, test_prompt, res["sample_prompt"])
        text = "\n\n".join(t for t in (said, res["summary"], line) if t)
        return (text, res["gallery"], res["problems"] or [["", "", ""]], _bucket_update(res, cfg),
                handlers.bucket_settings(cfg), *prompt)

    def scan_failed(e: Exception, was_offered: bool) -> tuple[Any, ...]:
        return err_text(e), [], [["", "", ""]], [["", ""]], None, *_keep_prompt(was_offered)

    def do_scan(was_offered: bool, test_prompt: str, *values: Any) -> tuple[Any, ...]:
        try:
            return scan_outputs(ctx.config(values), was_offered, test_prompt)
        except Exception as e:  # noqa: BLE001 - shown to the user, never a traceback page
            return scan_failed(e, was_offered)

    def do_upload(files: Any, was_offered: bool, test_prompt: str, *values: Any) -> tuple[Any, ...]:
        """Dropped files go into the dataset folder (without one, a new folder named after the
        LoRA: handlers.upload_folder), which is then shown as Load dataset shows it."""
        try:
            cfg = ctx.config(values)
            target = handlers.upload_folder(cfg)
            added = handlers.import_uploads(compat.file_paths(files), target)
            cfg = build_config({"data.train_data_dir": str(target)}, base=cfg)
            said = f"added {len(added)} file(s) to {target}"
            return str(target), *scan_outputs(cfg, was_offered, test_prompt, said)
        except Exception as e:  # noqa: BLE001
            return compat.update(), *scan_failed(e, was_offered)

    def wire_scan(event: Any, fn: Any = do_scan, first: tuple[Any, ...] = (), shows: tuple[Any, ...] = ()) -> None:
        # the Captions table follows the folder too
        reload_captions, caption_outputs = ctx.parts["caption_reload"]
        scanned = [summary, gallery, problems, buckets, shown, *_prompt_outputs(ctx)]
        event(fn, [*first, *_prompt_inputs(ctx), *ctx.inputs], [*shows, *scanned]
              ).then(reload_captions, ctx.inputs, caption_outputs)

    ctx.later(lambda: wire_scan(load.click))
    ctx.later(lambda: wire_scan(folder.submit))
    do_buckets = _bucket_refresher(ctx)

    def wire_buckets(comp: Any) -> None:
        # change: presets, loaded configs, clicks. gradio 3.x sends one change per keystroke and
        # drops those that come while one runs ("1" of "128"), so leaving the box counts too.
        for event in (comp.change, getattr(comp, "blur", None)):
            if event is not None:
                event(do_buckets, [shown, *ctx.inputs], [buckets, shown])

    for path in handlers.BUCKET_FIELDS:
        ctx.later(lambda path=path: wire_buckets(ctx.fields[path]))
    ctx.later(lambda: wire_scan(upload.upload, do_upload, (upload,), (folder,)))


def _bucket_refresher(ctx: TabContext) -> Any:
    """The handler of a bucket setting's change (typed, a preset, a loaded config): the preview
    of the new buckets, once the dataset was loaded (``was``: the settings it was shown with)."""
    def do_buckets(was: Any, *values: Any) -> tuple[Any, Any]:
        try:
            cfg = ctx.config(values)
        except Exception:  # noqa: BLE001 - a half-typed field elsewhere; the next change retries
            return compat.update(), was
        if was is None or list(was) == handlers.bucket_settings(cfg):
            return compat.update(), was
        try:
            return _bucket_update(handlers.scan(cfg.data.train_data_dir, cfg), cfg), handlers.bucket_settings(cfg)
        except Exception:  # noqa: BLE001 - say the preview is stale instead
            return compat.update(label=f"Bucket preview (of resolution {was[0]}; the resolution is now "
                                       f"{cfg.data.resolution}: press Load dataset)"), was

    return do_buckets


def _bucket_update(res: dict[str, Any], cfg: TrainConfig) -> Any:
    return compat.update(value=res["buckets"] or [["", ""]], label=f"Bucket preview (resolution {cfg.data.resolution})")


# A dataset whose captions become known (loaded, captioned, saved) fills an empty sample prompt
# with one of them, and an empty prompt of the Test section; the page's flag says it did, once.
def _prompt_inputs(ctx: TabContext) -> list[Any]:
    return [ctx.parts["prompt_offered"], ctx.parts["test_prompt"]]


def _prompt_outputs(ctx: TabContext) -> list[Any]:
    return [ctx.fields["sample.prompt"], ctx.parts["test_prompt"], ctx.parts["prompt_offered"]]


def _keep_prompt(offered: bool) -> tuple[Any, ...]:
    return compat.update(), compat.update(), bool(offered)  # a State's update() is not ignored by every gradio


def _prompt_from_folder(cfg: TrainConfig, offered: bool, test_prompt: str | None) -> tuple[tuple[Any, ...], str]:
    """:func:`_prompt_updates` with the captions of the form's dataset folder as they are on disk
    (read only while the prompt may still be filled)."""
    if offered or cfg.sample.prompt.strip():
        return _keep_prompt(offered), ""
    try:
        found = handlers.dataset_sample_prompt(cfg.data.train_data_dir, cfg)
    except Exception:  # noqa: BLE001 - the captions were saved; a folder the scan refuses fills nothing
        log.warning("no sample prompt from %s", cfg.data.train_data_dir, exc_info=True)
        return _keep_prompt(offered), ""
    return _prompt_updates(cfg, offered, test_prompt, found)


def _prompt_updates(cfg: TrainConfig, offered: bool, test_prompt: str | None,
                    found: tuple[str, str] | None) -> tuple[tuple[Any, ...], str]:
    """The updates of :func:`_prompt_outputs` and the line that says what changed ("" for none)."""
    got = handlers.offered_sample_prompt(cfg, bool(offered), found)
    if got is None:
        return _keep_prompt(offered), ""
    prompt, line = got
    return (prompt, compat.update() if (test_prompt or "").strip() else prompt, True), line


# -- Captions ------------------------------------------------------------------------------

def _captions_section(ctx: TabContext) -> None:
    g = compat.gr()
    with g.Row():
        model = g.Dropdown(["blip", "clip", "both"], value="blip", label="Caption with", elem_id=ctx.eid("caption-model"))
        mode = g.Dropdown(["overwrite", "append", "skip-existing"], value="overwrite", label="Existing captions",
                          elem_id=ctx.eid("caption-mode"))
        fmt = g.Dropdown(["auto", "csv", "txt", "both"], value="auto", label="Save as",
                         info="auto keeps the folder's layout (metadata.csv or .txt files)", elem_id=ctx.eid("caption-format"))
        run = g.Button("Caption images", variant="primary", elem_id=ctx.eid("caption-run"))
    status = g.Markdown(elem_id=ctx.eid("caption-status"))
    table = compat.dataframe(headers=["file", "caption"], label="Captions (edit, then Save)", interactive=True,
                             height=420, elem_id=ctx.eid("caption-table"))
    with g.Row():
        reload_ = g.Button("Reload from disk", elem_id=ctx.eid("caption-reload"))
        save = g.Button("Save captions", variant="primary", elem_id=ctx.eid("caption-save"))
    with g.Row():
        trigger = ctx.field("data.trigger_word", scale=2)
        add_trigger = g.Button("Add trigger word to all", elem_id=ctx.eid("caption-add-trigger"), scale=1)
    with g.Row():
        find = g.Textbox(label="Find", elem_id=ctx.eid("caption-find"))
        repl = g.Textbox(label="Replace with", elem_id=ctx.eid("caption-replace"))
        regex = g.Checkbox(label="regular expression", value=False, elem_id=ctx.eid("caption-regex"))
        do_repl = g.Button("Replace in all", elem_id=ctx.eid("caption-replace-run"))
    freq = compat.dataframe(headers=["tag", "count"], label="Tag frequencies", interactive=False, height=240,
                            elem_id=ctx.eid("tag-freq"))

    def do_reload(*values: Any) -> tuple[Any, ...]:
        try:
            cfg = ctx.config(values)
            rows = handlers.load_caption_rows(cfg.data.train_data_dir, cfg)
            return _with_freq(rows, f"{len(rows)} images, {sum(1 for r in rows if r[1].strip())} with a caption")
        except Exception as e:  # noqa: BLE001
            return [["", ""]], [["", ""]], err_text(e)

    def do_save(table_value: Any, fmt_value: str, was_offered: bool, test_prompt: str, *values: Any) -> tuple[Any, ...]:
        try:
            cfg = ctx.config(values)
            rows = handlers.normalize_rows(table_value)
            msg = handlers.save_caption_rows(cfg.data.train_data_dir, rows, cfg, fmt_value)
            return _offering(cfg, was_offered, test_prompt, rows, msg)
        except Exception as e:  # noqa: BLE001
            return compat.update(), compat.update(), err_text(e), *_keep_prompt(was_offered)

    def do_trigger(table_value: Any, word: str) -> tuple[Any, ...]:
        rows = handlers.add_trigger(handlers.normalize_rows(table_value), word)
        return _with_freq(rows, f"added '{word.strip()}' in front of every caption (not saved yet)")

    def do_replace(table_value: Any, f: str, r: str, rx: bool) -> tuple[Any, ...]:
        try:
            rows, n = handlers.find_replace(handlers.normalize_rows(table_value), f, r, rx)
            return _with_freq(rows, f"changed {n} caption(s) (not saved yet)")
        except Exception as e:  # noqa: BLE001
            return compat.update(), compat.update(), err_text(e)

    outs = [table, freq, status]
    ctx.parts["caption_reload"] = (do_reload, outs)
    ctx.later(lambda: reload_.click(do_reload, ctx.inputs, outs))
    ctx.later(lambda: save.click(do_save, [table, fmt, *_prompt_inputs(ctx), *ctx.inputs], [*outs, *_prompt_outputs(ctx)]))
    _wire_caption_run(ctx, run, [model, mode, fmt], outs)
    add_trigger.click(do_trigger, [table, trigger], outs)
    do_repl.click(do_replace, [table, find, repl, regex], outs)


def _with_freq(rows: handlers.Rows, msg: str) -> tuple[Any, ...]:
    """The Captions section's table, tag frequencies and status."""
    return rows or [["", ""]], handlers.tag_frequencies(rows) or [["", ""]], msg


def _offering(cfg: TrainConfig, was_offered: bool, test_prompt: str, rows: handlers.Rows, msg: str) -> tuple[Any, ...]:
    """:func:`_with_freq`, and an empty sample prompt filled from the captions now on disk."""
    prompt, line = _prompt_from_folder(cfg, was_offered, test_prompt)
    return (*_with_freq(rows, f"{msg}\n\n{line}" if line else msg), *prompt)


def _wire_caption_run(ctx: TabContext, run: Any, choices: list[Any], outs: list[Any]) -> None:
    """**Caption images** (``choices``: model, mode and format dropdowns): progress in the status,
    then the new captions in the table."""
    def do_caption(model_value: str, mode_value: str, fmt_value: str, was_offered: bool, test_prompt: str,
                   *values: Any) -> Iterator[tuple[Any, ...]]:
        try:
            cfg = ctx.config(values)
            folder = cfg.data.train_data_dir
            total = 0
            for done, total in _caption_steps(ctx, model_value, mode_value, fmt_value, folder, cfg):
                yield (compat.update(), compat.update(), f"captioning with {model_value}… {done}/{total or '?'}",
                       *_keep_prompt(was_offered))
            rows = handlers.load_caption_rows(folder, cfg)
            yield _offering(cfg, was_offered, test_prompt, rows, f"captioned {total} image(s) with {model_value} and wrote them")
        except Exception as e:  # noqa: BLE001
            yield compat.update(), compat.update(), handlers.caption_error_text(e, model_value), *_keep_prompt(was_offered)

    ctx.later(lambda: run.click(do_caption, [*choices, *_prompt_inputs(ctx), *ctx.inputs], [*outs, *_prompt_outputs(ctx)]))


def _borrowed_captioner(ctx: TabContext, model: str) -> Captioner | None:
    """The captioner to use instead of loading BLIP: one given to the tab, or the host's own
    (the WebUI's interrogator, which loads and unloads its model per call). CLIP-only runs need
    neither."""
    if model == "clip":
        return None
    return ctx.captioner or ctx.host.captioner


def _caption_steps(ctx: TabContext, model: str, mode: str, fmt: str, folder: str,
                   cfg: TrainConfig) -> Iterator[tuple[int, int]]:
    """Caption in a worker thread, yielding (done, total) about twice a second for the page."""
    progress: dict[str, int] = {"done": 0, "total": 0}
    result: dict[str, Any] = {}

    def cb(done: int, total: int) -> None:
        progress.update(done=done, total=total)

    def work() -> None:
        try:
            captioner = _borrowed_captioner(ctx, model)
            result["report"] = handlers.caption_folder(folder, model, mode, fmt, cfg, captioner, cb)
        except Exception as e:  # noqa: BLE001 - re-raised in the event handler below
            result["error"] = e

    thread = threading.Thread(target=work, name="lora-trainer-caption", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        yield progress["done"], progress["total"]
    if "error" in result:
        raise result["error"]
