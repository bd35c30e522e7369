"""The Train and Test sections of the tab."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer import config as cfgmod
from lora_trainer import jobs
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.families import DEFAULT_FAMILY, family_names
from lora_trainer.fsutil import atomic_write_text
from lora_trainer.locks import WaitCancelled
from lora_trainer.ui import compat, handlers, presets
from lora_trainer.ui.context import TabContext, err_text
from lora_trainer.ui.fields import UI_FIELDS, config_from_data, to_component, values_from_config, yaml_text_data
from lora_trainer.ui.fields import _kind as field_kind

if TYPE_CHECKING:
    from lora_trainer.hosts.base import Host

# In view at the top of the Train section; everything else goes under "Advanced".
# The network type sits in the wide first row: its help has a line per type.
HEAD_FIELDS = ["output.output_name", "model.base_model", "network.type"]
COMMON_FIELDS = ["network.rank", "network.alpha", "optim.learning_rate", "train.max_train_steps",
                 "train.epochs", "train.batch_size", "data.resolution"]
SAMPLE_FIELDS = ["sample.prompt", "sample.every_n_steps", "sample.every_n_minutes", "sample.seed"]
PLACED_ELSEWHERE = {"data.train_data_dir", "data.trigger_word"}  # Dataset / Captions sections
PRESET_FIELDS = sorted({k for name in presets.PRESET_NAMES[1:] for arch in family_names()
                        for k in presets.preset_values(name, arch)} | set(presets.AUTO_ONLY_FIELDS))
CUSTOM_PRESET = "custom"  # shown when the form's values are no preset's (choosing it changes nothing)
# What a WebUI does not read: it trains the checkpoint it has loaded, on its device and in its
# weights (the model section but the base model it shows), and SD1/SD2/SDXL only (the
# rectified-flow settings of Flux.1 and SD3.5). There these fields are hidden, not left out, so a
# loaded file or run keeps its values through the form.
NOT_READ_IN_A_WEBUI = frozenset([p for p in UI_FIELDS if p.startswith("model.") and p != "model.base_model"]
                                + ["train.timestep_sampling", "train.discrete_flow_shift", "train.guidance_scale"])


def hidden_fields(host: Host) -> frozenset[str]:
    """The fields the tab hides for ``host``: those a WebUI does not read; none standalone."""
    return NOT_READ_IN_A_WEBUI if host.loaded_model() is not None else frozenset()


def _advanced_fields(hidden: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    shown = set(HEAD_FIELDS) | set(COMMON_FIELDS) | set(SAMPLE_FIELDS) | PLACED_ELSEWHERE | hidden
    out: dict[str, list[str]] = {}
    for path in UI_FIELDS:
        if path not in shown:
            out.setdefault(path.split(".", 1)[0], []).append(path)
    return out


def _form(ctx: TabContext) -> Any:
    """The config fields: the head row with the preset dropdown (returned), the common and sample
    rows, and the Advanced accordion by section (the fields a WebUI does not read hidden there)."""
    g = compat.gr()
    with g.Row():
        for path in HEAD_FIELDS:
            ctx.field(path, **_host_field_overrides(ctx, path))
        preset = _preset_dropdown(ctx)
    for row in (COMMON_FIELDS, SAMPLE_FIELDS):
        with g.Row():
            for path in row:
                ctx.field(path)
    hidden = hidden_fields(ctx.host)
    with g.Accordion("Advanced", open=False, elem_id=ctx.eid("advanced")):
        for section, paths in _advanced_fields(hidden).items():
            g.Markdown(f"**{section}**", elem_classes=[ctx.eid("advanced-heading")])
            for i in range(0, len(paths), 3):
                with g.Row():
                    for path in paths[i:i + 3]:
                        ctx.field(path)
        for path in sorted(hidden):
            ctx.field(path, visible=False)
    return preset


def _command(name: str) -> Any:
    """A button's handler that asks the running job to ``name`` (stop, save_now, sample_now)."""
    def run() -> str:
        job = jobs.current()
        if job is None or not job.alive:
            return "no training run is in progress"
        getattr(job, name)()
        return {"stop": "stopping: saving a checkpoint and the LoRA…", "save_now": "saving at the next step…",
                "sample_now": "rendering a sample at the next step…"}[name]
    return run


def train_section(ctx: TabContext, blocks: Any) -> None:
    g = compat.gr()
    preset = _form(ctx)
    _yaml_block(ctx)
    with g.Row():
        start = g.Button("Start training", variant="primary", elem_id=ctx.eid("start"))
        stop = g.Button("Stop", variant="secondary", elem_id=ctx.eid("stop"))  # red only while a run is alive
        go_on = g.Button("Continue", visible=False, elem_id=ctx.eid("continue"))  # shown for a stopped run
        save = g.Button("Save now", elem_id=ctx.eid("save-now"))
        sample = g.Button("Sample now", elem_id=ctx.eid("sample-now"))
    msg = g.Markdown(elem_id=ctx.eid("train-msg"))
    ctx.parts["train_msg"] = msg
    progress = g.HTML(handlers.progress_html(None, ctx.prefix), elem_id=ctx.eid("progress"))
    with g.Row():
        # Two plots rather than one with a colour channel: a colour-split LinePlot that starts
        # empty draws no lines on gradio 6 (its legend never resolves), one series per plot does.
        with g.Column():
            plot = compat.line_plot(x="step", y="loss", title="Loss", height=180, elem_id=ctx.eid("loss-plot"),
                                    elem_classes=[ctx.eid("plot")])
            smooth = compat.line_plot(x="step", y="loss", title="Loss, smoothed", height=180,
                                      elem_id=ctx.eid("loss-smooth-plot"), elem_classes=[ctx.eid("plot")])
        samples = compat.gallery(label="Samples", columns=3, height=380, elem_id=ctx.eid("samples"))
    log = compat.textbox(label="Log", lines=8, max_lines=8, interactive=False, autoscroll=True, elem_id=ctx.eid("log"),
                         elem_classes=[ctx.eid("log")])
    seen = g.State(None)

    def do_start(*values: Any) -> tuple[str, Any]:
        try:
            cfg = ctx.config(values)
            if not cfg.data.train_data_dir:
                raise ConfigError("data.train_data_dir: choose the dataset folder in the Dataset section")
            loaded = ctx.host.loaded_model()
            if loaded is not None:
                loaded.require_trainable()  # Flux, no checkpoint, ...: one line, before any work
            job = jobs.start(cfg, ctx.host)
            # "starting…" at once: the next poll is up to a second away
            return f"started training '{cfg.output.output_name}'", handlers.progress_html(job.snapshot(), ctx.prefix)
        except Exception as e:  # noqa: BLE001
            return err_text(e), compat.update()

    # .input: the user's choice only; the label a loaded form sets (form_of) must not apply a preset again
    # "auto" sizes the form as it is: the whole form comes too
    ctx.later(lambda: preset.input(_preset_applier(ctx), [preset, ctx.fields["model.arch"], ctx.fields["network.type"],
                                                          ctx.fields["data.crop"], ctx.fields["data.color_aug"],
                                                          *ctx.inputs],
                                   [ctx.fields[p] for p in PRESET_FIELDS] + [msg]))
    ctx.later(lambda: start.click(do_start, ctx.inputs, [msg, progress]))
    stop.click(_command("stop"), None, [msg])
    _wire_continue(ctx, go_on, msg, progress)
    save.click(_command("save_now"), None, [msg])
    sample.click(_command("sample_now"), None, [msg])
    ctx.later(lambda: compat.add_timer(blocks, lambda s: _poll(ctx, s), [seen],
                                       [progress, plot, smooth, samples, log, ctx.parts["test_lora"], msg, stop,
                                        go_on, seen], 1.0))


def _preset_applier(ctx: TabContext) -> Any:
    """The preset dropdown's handler: the preset's values into its fields, and a line saying what
    it set (for "auto": what it picked for the GPU's free memory) into the message."""
    def apply_preset(name: str, arch: str, network: str, crop: str = "center", color_aug: bool = False,
                     *form: Any) -> list[Any]:
        if not name or name == CUSTOM_PRESET:  # "custom" changes nothing
            return [compat.update() for _ in PRESET_FIELDS] + [compat.update()]
        free = presets.gpu_free_gb() if name == "auto" else None  # read once: the values and the note agree
        encoded = crop == "random" or bool(color_aug)  # every step encodes its images: auto counts the VAE
        cfg = _form_config(ctx, form) if name == "auto" else None
        values = preset_for_host(ctx.host, name, arch, network, free, encoded, cfg)
        note = auto_note_for_host(ctx.host, arch, network, free, encoded, cfg) if name == "auto" else \
            f"preset {name} applied"
        return [compat.update(value=to_component(values[p], field_kind(p)[0])) if p in values else compat.update()
                for p in PRESET_FIELDS] + [note]
    return apply_preset


def _form_config(ctx: TabContext, values: tuple[Any, ...]) -> Any:
    """The form's config from its fields' ``values``, or None without them or where a field does
    not read (auto then sizes the preset's own settings alone)."""
    if not values:
        return None
    try:
        return ctx.config(values)
    except (LoraTrainerError, ValueError):
        return None


def _for_host(host: Host, form_arch: str, network: str, encoded: bool = False,
              form: Any = None) -> tuple[str, dict[str, Any]]:
    """The family a preset is sized for (the host's loaded model's when it has one, a WebUI's
    checkpoint; else the form's ``model.arch``, auto: the default family) and the facts the
    presets take: the loaded model's, whether every step encodes its images (``encoded``) and
    the form's config (``form``, for what auto sizes with it)."""
    loaded = host.loaded_model()
    family = loaded.family if loaded is not None else None
    if family is None:
        family = form_arch if form_arch and form_arch != "auto" else DEFAULT_FAMILY
    return family, {"model_resident": loaded is not None and loaded.resident, "network": network or "lora",
                    "weights_cast": loaded.weights_cast if loaded is not None else None,
                    "compute_dtype": loaded.compute_dtype if loaded is not None else None,
                    "latents_cached": not encoded, "form": form}


def preset_for_host(host: Host, name: str, form_arch: str, network: str = "lora",
                    free_gb: float | None = None, encoded: bool = False, form: Any = None) -> dict[str, Any]:
    """Preset ``name``'s values for the model the run will train, sized for the form's
    ``network.type`` (and, ``encoded``, its images encoded every step; ``form``, its config);
    "auto" for ``free_gb`` of GPU memory (read from the GPU when not given)."""
    family, facts = _for_host(host, form_arch, network, encoded, form)
    return presets.preset_values(name, family, free_gb, **facts)


def auto_note_for_host(host: Host, form_arch: str, network: str, free_gb: float | None,
                       encoded: bool = False, form: Any = None) -> str:
    """The line the tab shows when "auto" is chosen: what it picked for ``free_gb`` (None: no GPU)."""
    family, facts = _for_host(host, form_arch, network, encoded, form)
    return presets.auto_summary(family, free_gb, **facts)


def _preset_dropdown(ctx: TabContext) -> Any:
    """Shows the preset the form's defaults came from ("custom" when none), never a blank; "auto"
    where a page with no run to show starts from it (``TabContext.start_auto``)."""
    d = ctx.defaults
    shown = "auto" if ctx.start_auto else (
        presets.preset_of(d, d.model.arch if d.model.arch != "auto" else DEFAULT_FAMILY) or CUSTOM_PRESET)
    dropdown = compat.gr().Dropdown([CUSTOM_PRESET, *presets.PRESET_NAMES], value=shown, label="Preset (GPU memory)",
                                    info="sets resolution, batch, rank, precision and memory savers",
                                    elem_id=ctx.eid("preset"))
    ctx.parts["preset"] = dropdown
    return dropdown


def auto_form(ctx: TabContext) -> tuple[list[Any], str]:
    """The "auto" preset as the form's updates (its fields; the others as they are) and its line,
    for the model the host has loaded now and the GPU's free memory now."""
    d = ctx.defaults
    *values, note = _preset_applier(ctx)("auto", d.model.arch, d.network.type, d.data.crop, d.data.color_aug)
    by_path = dict(zip(PRESET_FIELDS, values, strict=True))
    return [by_path.get(p, compat.update()) for p in ctx.paths], note


def shown_preset(ctx: TabContext, cfg: Any) -> str:
    """The dropdown's label for a form holding ``cfg``: the fixed preset whose every value it has,
    for the model the run trains, else "custom" ("auto" is a choice, not a set of values)."""
    family, facts = _for_host(ctx.host, cfg.model.arch, cfg.network.type)
    return presets.preset_of(cfg, family, **facts) or CUSTOM_PRESET


def form_outputs(ctx: TabContext) -> list[Any]:
    """The components a whole loaded config sets: every field, then the preset's label."""
    return [*ctx.inputs, ctx.parts["preset"]]


def form_of(ctx: TabContext, cfg: Any, *, as_run: bool = True) -> list[Any]:
    """``form_outputs``' values for ``cfg`` (:func:`form_values_of`), then the preset's label."""
    return [*form_values_of(ctx, cfg, as_run=as_run), shown_preset(ctx, cfg)]


def _host_field_overrides(ctx: TabContext, path: str) -> dict[str, Any]:
    """In a WebUI the base model is the one loaded in the WebUI: shown, not chosen here."""
    loaded = ctx.host.loaded_model()
    if path != "model.base_model" or loaded is None:
        return {}
    info = loaded.unsupported or ("the model loaded in the WebUI is trained in place" if loaded.resident
                                  else "the checkpoint loaded in the WebUI is trained")
    # A callable value is read again on every page load: the WebUI's checkpoint may change (and
    # Forge picks its checkpoint only after the tabs are built).
    return {"interactive": False, "info": info, "value": lambda: loaded_label(ctx.host)}


def form_values_of(ctx: TabContext, cfg: Any, *, as_run: bool = True) -> list[Any]:
    """The form's values for a run's config, to start the next run from (``as_run`` false: a
    loaded file's, its ``train.resume`` kept). In a WebUI the base-model field shows the WebUI's
    model, which is what a run trains (a run started through the API carries the config's
    default base model, "demo", and a file may name another)."""
    # train.resume belongs to that run's start: kept in the form, a new run would take the old
    # run's checkpoint (Continue sets it itself)
    values = values_from_config(cfgmod.build_config({"train.resume": None}, base=cfg) if as_run else cfg, ctx.paths)
    if "model.base_model" in ctx.paths and ctx.host.loaded_model() is not None:
        values[ctx.paths.index("model.base_model")] = loaded_label(ctx.host)
    return values


def loaded_label(host: Host) -> str:
    """The base-model field's text in a WebUI: the WebUI's checkpoint, or why it cannot be trained."""
    try:
        loaded = host.loaded_model()
    except Exception:  # noqa: BLE001 - a label must never break the page
        return "(the model loaded in the WebUI)"
    return loaded.label if loaded is not None else ""


def _wire_continue(ctx: TabContext, go_on: Any, msg: Any, progress: Any) -> None:
    """Continue takes a run on from the form's output folder; leaving that field offers the
    folder's unfinished run (the page's first poll looks in the default folder only)."""
    out_dir = ctx.fields["output.output_dir"]

    def do_continue(folder: str) -> list[Any]:
        """The continued run's settings go into the form, as a page loaded during it shows them."""
        try:
            job, said = handlers.continue_stopped(ctx.host, folder or ctx.defaults.output.output_dir)
            return [said, handlers.progress_html(job.snapshot(), ctx.prefix), *form_of(ctx, job.config)]
        except Exception as e:  # noqa: BLE001
            return [err_text(e), compat.update(), *(compat.update() for _ in form_outputs(ctx))]

    def offer_unfinished(folder: str, said: str) -> list[Any]:
        return _offer_unfinished(ctx, folder, said)

    ctx.later(lambda: go_on.click(do_continue, [out_dir], [msg, progress, *form_outputs(ctx)]))
    out_dir.blur(offer_unfinished, [out_dir, msg], [msg, go_on])


def _offer_unfinished(ctx: TabContext, folder: str, said: str) -> list[Any]:
    """[message, Continue] when the form's output folder is left: its newest unfinished run, as the
    page's first poll offers the default folder's (a run in another folder, then a restart, would
    not be found otherwise). A run of this process that is going on or can be continued keeps
    both as they are; a folder without an unfinished run takes back the offer of another."""
    keep = compat.update()
    job = jobs.current()
    if job is not None and (job.alive or handlers.continuable(job.snapshot())):
        return [keep, keep]
    found = handlers.unfinished_run(folder or runs_folder_of(ctx))  # None for an unreadable folder
    if found is not None:
        return [handlers.unfinished_text(found), compat.update(visible=True)]
    offered = str(said or "").startswith(handlers.UNFINISHED_PREFIX)
    return [("" if offered else keep), compat.update(visible=False)]


def runs_folder_of(ctx: TabContext) -> str:
    """Where a page with no run of this process looks for one: the folder the last run started
    in where the tab remembers it (a WebUI's), else the default output folder."""
    default_dir = ctx.defaults.output.output_dir
    return handlers.runs_folder(default_dir) if ctx.remember_last_run else default_dir


def _poll(ctx: TabContext, seen: Any) -> list[Any]:
    """Progress for the page from the current job's snapshot; unchanged parts are not re-sent.

    ``seen`` is None on a page's first poll only: a run that had ended before the page was loaded
    is shown in the progress line, and its outcome is not written over the message under Start,
    which by then may hold what the user's first action said (a preset's note)."""
    keep = compat.update()
    job = jobs.current()
    if job is None:  # nothing ran since the start: a page's first poll offers a run left unfinished before it
        found = handlers.unfinished_run(runs_folder_of(ctx)) if seen is None else None
        msg = handlers.unfinished_text(found) if found is not None else keep
        go_on = compat.update(visible=found is not None) if seen is None else keep
        # "idle" once: sent every second, a poll answered just after Start would overwrite its "starting…"
        idle = handlers.progress_html(None, ctx.prefix) if seen is None else keep
        return [idle, keep, keep, keep, keep, keep, msg, keep, go_on, [None]]
    snap = job.snapshot()
    key = [job.id, len(snap["losses"]), len(snap["samples"]), len(snap["log"]), snap["status"],
           snap.get("checkpoints", 0), job.alive]
    old = seen if isinstance(seen, list) and len(seen) == len(key) and seen[0] == job.id else [None] * len(key)
    raw, smooth = (handlers.loss_frames(snap["losses"]) if key[1] != old[1] else (keep, keep))
    gallery = handlers.sample_gallery(snap["samples"]) if key[2] != old[2] else keep
    log = "\n".join(snap["log"][-200:]) if key[3] != old[3] else keep
    loras = keep
    finished = snap["status"] in ("done", "stopped", "finished")
    if (key[4] != old[4] and finished) or key[5] != old[5]:  # a new final or step LoRA in the folder
        names = handlers.list_loras(ctx.host.lora_dir(job.config))
        loras = compat.update(choices=names, value=names[0] if names else None) if finished else compat.update(choices=names)
    # the run's end replaces "started…"/"stopping…" under the buttons with how it ended
    ended_here = seen is not None and key[4] != old[4] and snap["status"] in handlers.FINAL_STATUSES
    msg = handlers.outcome_text(snap) if ended_here else keep
    changed = key[4] != old[4] or key[6] != old[6]
    stop = compat.update(variant="stop" if job.alive else "secondary") if key[6] != old[6] else keep
    go_on = compat.update(visible=not job.alive and handlers.continuable(snap)) if changed else keep
    return [handlers.progress_html(snap, ctx.prefix), raw, smooth, gallery, log, loras, msg, stop, go_on, key]


def _yaml_block(ctx: TabContext) -> None:
    g = compat.gr()
    with g.Accordion("Config as YAML (load / save)", open=False, elem_id=ctx.eid("yaml")):
        text = compat.textbox(copy_button=True, label="Config YAML", lines=12, elem_id=ctx.eid("config-yaml"))
        with g.Row():
            to_yaml = g.Button("Form → YAML", elem_id=ctx.eid("to-yaml"))
            from_yaml = g.Button("YAML → form", elem_id=ctx.eid("from-yaml"))
        with g.Row():
            path = g.Textbox(label="YAML file", placeholder="my_lora.yaml", elem_id=ctx.eid("yaml-path"), scale=3)
            save = g.Button("Save to file", elem_id=ctx.eid("yaml-save"), scale=1)
            load = g.Button("Load file", elem_id=ctx.eid("yaml-load"), scale=1)
        status = g.Markdown(elem_id=ctx.eid("yaml-status"))

    def form_to_yaml(*values: Any) -> tuple[str, str]:
        try:
            return ctx.config(values).to_yaml(), ""
        except Exception as e:  # noqa: BLE001
            return compat.update(), err_text(e)

    def yaml_to_form(yaml_text: str) -> list[Any]:
        try:
            data = yaml_text_data(yaml_text)
            cfg = config_from_data(data, "config YAML")
            return [*form_of(ctx, cfg, as_run=False), _loaded("loaded into the form", data)]
        except Exception as e:  # noqa: BLE001
            return [*(compat.update() for _ in form_outputs(ctx)), err_text(e)]

    def save_file(p: str, *values: Any) -> str:
        try:
            if not p.strip():
                raise ConfigError("YAML file: enter a file name, e.g. my_lora.yaml")
            cfg = ctx.config(values)
            atomic_write_text(Path(p.strip()).expanduser(), cfg.to_yaml())
            return f"saved {p.strip()}"
        except Exception as e:  # noqa: BLE001
            return err_text(e)

    def load_file(p: str) -> list[Any]:
        try:
            data = cfgmod.read_yaml(Path(p.strip()).expanduser())
            cfg = config_from_data(data, p.strip())
            return [*form_of(ctx, cfg, as_run=False), cfg.to_yaml(), _loaded(f"loaded {p.strip()}", data)]
        except Exception as e:  # noqa: BLE001
            return [*(compat.update() for _ in form_outputs(ctx)), compat.update(), err_text(e)]

    ctx.later(lambda: to_yaml.click(form_to_yaml, ctx.inputs, [text, status]))
    ctx.later(lambda: from_yaml.click(yaml_to_form, [text], [*form_outputs(ctx), status]))
    ctx.later(lambda: save.click(save_file, [path, *ctx.inputs], [status]))
    ctx.later(lambda: load.click(load_file, [path], [*form_outputs(ctx), text, status]))


def _loaded(said: str, data: dict[str, Any]) -> str:
    """The load's line (Markdown), and the keys of other trainers' files it kept without effect,
    a line per reason."""
    lines = cfgmod.SCHEMA.ignored_keys(data)
    if not lines:
        return said
    out = [f"{said}; keys of other trainers, kept without effect here:"]
    for line in lines:
        keys, why = line.split(": ", 1)
        out.append(f"- {', '.join(f'`{k}`' for k in keys.split(', '))}: {why.replace('<', '&lt;')}")
    return "\n".join(out)


# -- Test ----------------------------------------------------------------------------------

def test_section(ctx: TabContext) -> None:
    g = compat.gr()
    d = ctx.defaults
    t = (cfgmod.sample_prompts_of(d.sample) or [d.sample])[0]  # the first sample prompt, with its options
    with g.Row():
        lora = g.Dropdown(choices=handlers.list_loras(lora_dir_of(ctx, d)), label="LoRA", elem_id=ctx.eid("test-lora"), scale=4)
        refresh = g.Button("Refresh list", elem_id=ctx.eid("test-refresh"), scale=1)
    prompt = g.Textbox(label="Prompt (a <lora:name:w> tag picks the LoRA too; the weight comes from the sweep)",
                       value=t.prompt, lines=2, elem_id=ctx.eid("test-prompt"))
    negative = g.Textbox(label="Negative prompt", value=t.negative_prompt, elem_id=ctx.eid("test-negative"))
    with g.Row():
        seed = g.Number(label="Seed", value=t.seed, precision=0, elem_id=ctx.eid("test-seed"))
        steps = g.Number(label="Steps", value=t.steps, precision=0, elem_id=ctx.eid("test-steps"))
        width = g.Number(label="Width", value=t.width or d.data.resolution, precision=0, elem_id=ctx.eid("test-width"))
        height = g.Number(label="Height", value=t.height or d.data.resolution, precision=0,
                          elem_id=ctx.eid("test-height"))
        weights = g.Textbox(label="Weights", value="0, 0.5, 0.7, 1", elem_id=ctx.eid("test-weights"))
    render = g.Button("Render weight sweep", variant="primary", elem_id=ctx.eid("render"))
    msg = g.Markdown(elem_id=ctx.eid("test-msg"))
    grid = compat.gallery(label="Weight sweep (same seed)", columns=4, height=320, elem_id=ctx.eid("test-grid"))
    with g.Row():
        tag = compat.textbox(copy_button=True, label="LoRA tag", interactive=True, elem_id=ctx.eid("lora-tag"), scale=3)
        copy = g.Button("Copy tag", elem_id=ctx.eid("copy-tag"), scale=1)
        send = g.Button("Send to txt2img", elem_id=ctx.eid("send-txt2img"), scale=1,
                        visible=ctx.host.has_txt2img)
    ctx.parts["test_lora"] = lora
    ctx.parts["test_prompt"] = prompt

    def do_refresh(*values: Any) -> Any:
        try:
            names = handlers.list_loras(lora_dir_of(ctx, ctx.config(values)))
            return compat.update(choices=names, value=names[0] if names else None)
        except Exception:  # noqa: BLE001 - a bad field elsewhere must not break the list
            return compat.update()

    def do_render(name: str, p: str, n: str, s: float, st: float, w: float, h: float, ws: str,
                  *values: Any) -> tuple[Any, str]:
        try:
            weights_ = handlers.parse_weights(ws)
            with _model_for_render(ctx, values):
                items = handlers.render_sweep(ctx.host, p, n, int(s), name or "", weights_, int(st), int(w), int(h))
            shown = items[0][1].rsplit(" @ ", 1)[0] if items else name
            return items, f"rendered {len(items)} image(s) of {shown}"
        except Exception as e:  # noqa: BLE001
            return compat.update(), err_text(e)

    ctx.later(lambda: refresh.click(do_refresh, ctx.inputs, [lora]))
    lora.change(lambda name: handlers.lora_tag(name or "", 0.7), [lora], [tag])
    ctx.later(lambda: render.click(do_render, [lora, prompt, negative, seed, steps, width, height, weights,
                                               *ctx.inputs], [grid, msg]))
    copy.click(None, [tag], None, **compat.js_kwargs("(t) => { window.ltCopyTag && window.ltCopyTag(t); return []; }"))
    send.click(None, [tag], None,
               **compat.js_kwargs("(t) => { window.ltSendToTxt2img && window.ltSendToTxt2img(t); return []; }"))


@contextlib.contextmanager
def _model_for_render(ctx: TabContext, values: tuple[Any, ...]) -> Iterator[None]:
    """Standalone, the host renders with the model it loaded: load the form's base model first
    (cached, so only the first render after start-up pays for it). A host with a loaded model of
    its own (a WebUI) renders with that, so nothing happens there. Refused while a run holds it."""
    host = ctx.host
    if host.loaded_model() is not None:
        yield
        return
    try:
        with host.lock(lambda: False):  # busy: refused at once, a render must not wait behind a run
            host.release_bundle(host.acquire_bundle(ctx.config(values)))
    except WaitCancelled:
        raise handlers.model_busy() from None
    yield


def lora_dir_of(ctx: TabContext, cfg: Any) -> Path:
    try:
        return Path(ctx.host.lora_dir(cfg))
    except Exception:  # noqa: BLE001 - a host that cannot tell yet lists nothing
        return Path(cfg.output.output_dir)


