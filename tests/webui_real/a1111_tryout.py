"""Try the extension in a running, real A1111 WebUI as a user would (not part of the test suite).

Start a WebUI with the extension installed and a checkpoint loaded (for example the CPU harness
described in docs/a1111.md), then:

    python tests/webui_real/a1111_tryout.py --url http://127.0.0.1:7861 --shots docs/img

It drives the Train LoRA tab in headless Chromium (dataset, captions, train, a weight sweep in
the Test section, Stop and Continue from that step), then the HTTP API: txt2img with
``<lora:name:w>`` right after training, a run stopped mid-way, the same name trained twice, a run
started behind a generation (it waits, and Stop ends the wait), a run after a render that used
another LoRA, and a plain render compared with the one made before any training (the model must
be unchanged).
Prints one line per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.test_ui_browser import (  # noqa: E402
    choose,
    click,
    displayed,
    images_in,
    loading_marks,
    open_advanced,
    page_errors,
    said,
    set_text,
    shown_loading_marks,
    text_of,
    value_of,
)


def api(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(url + path, json.dumps(body).encode() if body is not None else None,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def webui_precision(url: str) -> str:
    """The precision the WebUI's UNet computes in, as train.mixed_precision names it: "no" for a
    WebUI started with --no-half (fp32), else fp16."""
    return "no" if api(url, "/sdapi/v1/cmd-flags").get("no_half") else "fp16"


def txt2img(url: str, prompt: str) -> np.ndarray:
    r = api(url, "/sdapi/v1/txt2img", {"prompt": prompt, "seed": 1234, "steps": 3, "width": 64, "height": 64,
                                       "sampler_name": "Euler", "cfg_scale": 5})
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["images"][0]))).convert("RGB")).astype(np.int16)


def wait_until(what: str, fn: Any, every: float = 1.0, limit: float = 1800.0) -> Any:
    """Poll until ``fn()`` is truthy; the limit only guards against a hung WebUI. An element the
    page re-drew while it was read is read again at the next poll."""
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            got = fn()
        except StaleElementReferenceException:
            got = None
        if got:
            return got
        time.sleep(every)
    raise SystemExit(f"FAIL: gave up waiting for {what}")


def check(ok: bool, text: str) -> None:
    print(("ok   " if ok else "FAIL ") + text, flush=True)
    if not ok:
        raise SystemExit(1)


def train_api(url: str, data: Path, name: str, steps: int, stop_at: int | None = None, **extra: Any) -> dict[str, Any]:
    job = api(url, "/lora_trainer/train", {"train_data_dir": str(data), "output_name": name, "max_train_steps": steps,
                                           "resolution": 64, "batch_size": 2, "save_steps": 0, **extra})["job_id"]
    if stop_at is not None:
        wait_until(f"step {stop_at}", lambda: (api(url, f"/lora_trainer/status?job_id={job}").get("state") or {})
                   .get("step", 0) >= stop_at, every=0.5)
        check(api(url, "/lora_trainer/stop", {"job_id": job})["stopping"], f"stop asked for '{name}' mid-run")
    return wait_until(f"run '{name}' to end", lambda: (lambda s: s if s["status"] not in ("running", "starting") else None)(
        api(url, f"/lora_trainer/status?job_id={job}")))


def busy_queue(url: str, data: Path, name: str) -> None:
    """A run started while a generation holds the WebUI's queue waits and says so; Stop ends the
    wait with nothing written; the generation is then interrupted and the queue is free again."""
    import threading

    gen = threading.Thread(target=lambda: api(url, "/sdapi/v1/txt2img", {
        "prompt": "a long render", "seed": 1, "steps": 150, "width": 256, "height": 256, "sampler_name": "Euler"}),
        daemon=True)
    gen.start()
    wait_until("the generation to hold the queue", lambda: api(url, "/sdapi/v1/progress")["state"]["job"], every=0.2)
    job = api(url, "/lora_trainer/train", {"train_data_dir": str(data), "output_name": name, "max_train_steps": 4,
                                           "resolution": 64, "save_steps": 0})["job_id"]
    status = lambda: api(url, f"/lora_trainer/status?job_id={job}")  # noqa: E731
    said = wait_until("the run to say it waits", lambda: next(
        (m for m in status()["state"]["log"] if m.startswith("waiting for the model")), None), every=0.5)
    check(status()["state"]["step"] == 0, f"api: a run behind a generation waits ({said[:60]}...)")
    api(url, "/lora_trainer/stop", {"job_id": job})
    end = wait_until("the waiting run to end", lambda: (lambda s: s if s["status"] not in ("running", "starting")
                                                         else None)(status()), every=0.5)
    check(end["status"] == "stopped" and end["result"]["lora_path"] is None and end["result"]["steps"] == 0,
          f"api: Stop ended the wait with nothing written ({end['state']['log'][-1]})")
    api(url, "/sdapi/v1/interrupt", {})
    gen.join(timeout=600)
    check(not gen.is_alive(), "the generation, interrupted, gave the queue back")


def open_webui_tab(d: Any, name: str) -> None:
    """One of the WebUI's own top-level tabs (txt2img, ..., Train LoRA)."""
    from selenium.webdriver.common.by import By

    xpath = f"//*[@id='tabs']//button[normalize-space()='{name}']"
    button = wait_until(f"WebUI tab {name}", lambda: [b for b in d.find_elements(By.XPATH, xpath) if b.is_displayed()])[0]
    button.click()
    wait_until(f"WebUI tab {name} shown", lambda: any(e.is_displayed() for e in d.find_elements(By.ID, "lt-sections")),
               every=0.2)


def open_tab_section(d: Any, name: str) -> None:
    """A section of our tab: its buttons are looked up inside the tab (the WebUI has a "Train" tab too)."""
    from selenium.webdriver.common.by import By

    xpath = f"//*[@id='lt-sections']//button[normalize-space()='{name}']"
    button = wait_until(f"section {name}", lambda: [b for b in d.find_elements(By.XPATH, xpath) if b.is_displayed()])[0]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()
    wait_until(f"section {name} shown", lambda: any("selected" in (b.get_attribute("class") or "")
                                                    for b in d.find_elements(By.XPATH, xpath)), every=0.2)


def image_sizes(folder: Path) -> list[tuple[str, tuple[int, int]]]:
    from PIL import Image

    return sorted((p.name, Image.open(p).size) for p in folder.glob("*.png"))


def differs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def _assets_refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/file=style.css", timeout=30)
    except urllib.error.HTTPError as e:
        return e.code == 403
    return False


def tab_flow(url: str, data: Path, shots: Path | None, name: str) -> str:
    """The tab as a user drives it; returns the output folder its run used, as the form shows it
    (the page may have restored a last run's folder)."""
    from lora_trainer.ui import screenshots

    d = screenshots.chrome(tempfile.mkdtemp(prefix="lt-tryout-"))
    d.set_window_size(1400, 1800)
    try:
        d.get(url)
        open_webui_tab(d, "Train LoRA")
        open_tab_section(d, "Train")  # as on a first visit: the page may show an earlier run's prompt
        set_text(d, "lt-f-sample-prompt", "")
        set_text(d, "lt-f-output-output-name", name)
        first = dataset_steps(d, data, name)
        open_tab_section(d, "Train")
        choose(d, "lt-preset", "8 GB")  # a fixed one first: on a first visit the form starts from "auto"
        wait_until("8 GB's note", lambda: said(d, "lt-train-msg") == "preset 8 GB applied")
        check(value_of(d, "lt-f-network-rank") == "16", "tab: choosing a preset sets its values (8 GB: rank 16)")
        choose(d, "lt-preset", "auto")
        note = wait_until("auto's note", lambda: (m := said(d, "lt-train-msg")).startswith("auto") and m)
        check(True, f"tab: the auto preset says what it picked ({note})")
        check(value_of(d, "lt-f-sample-prompt") == first, f"tab: the Train section's prompt reads '{first}'")
        prompts = f"{first}\na blue square --w 96 --h 64"
        set_text(d, "lt-f-sample-prompt", prompts)
        check(value_of(d, "lt-f-sample-prompt") == prompts, "tab: the sample prompt box takes a second prompt, a line "
                                                            "of its own with its size")
        set_text(d, "lt-f-output-output-name", name)
        set_text(d, "lt-f-train-max-train-steps", "6")
        set_text(d, "lt-f-data-resolution", "64")
        set_text(d, "lt-f-train-batch-size", "2")
        folder = value_of(d, "lt-f-output-output-dir")
        open_advanced(d)
        shown = [f for f in ("model-arch", "model-vae", "model-t5xxl", "model-device", "train-discrete-flow-shift",
                             "optim-optimizer", "train-mixed-precision") if displayed(d, f"lt-f-{f}")]
        check(shown == ["optim-optimizer", "train-mixed-precision"],
              f"tab: Advanced shows what the WebUI reads, not the model fields it does not ({shown})")
        click(d, "lt-start")
        started(d, name)
        wait_until("the tab's run to end", lambda: any(w in text_of(d, "lt-progress") for w in ("done", "error", "stopped")))
        progress = text_of(d, "lt-progress")
        if shots:
            d.save_screenshot(str(shots / "a1111_train.png"))
        check("done" in progress, f"tab: trained ({' '.join(progress.split())[:90]})")
        written = wait_until("the LoRA's path", lambda: [w for w in said(d, "lt-train-msg").split()
                                                         if w.endswith(".safetensors")])[0]
        wait_until("the end's samples of both prompts in the tab", lambda: len(images_in(d, "lt-samples")) == 2)
        check(Path(written).with_suffix(".png").is_file(),
              f"tab: the run's samples are shown, the first is the LoRA's preview card "
              f"({Path(written).with_suffix('.png').name}; {' | '.join(text_of(d, 'lt-samples').split(chr(10))[-2:])})")
        # gradio 3.x (A1111, Forge Classic) marks the poll's outputs as loading all the time
        gradio3 = str(d.execute_script("return (window.gradio_config || {}).version || ''")).startswith("3.")
        marks = loading_marks(d)
        shown = shown_loading_marks(marks)
        check((bool(marks) or not gradio3) and not shown,
              f"tab: the poll's outputs do not look as if loading ({len(marks)} marks hidden) {shown[:3] if shown else ''}")
        weight_sweep(d, name, shots)
        stop_and_continue(d, name)
        page_shows_the_run(d, url, f"{name}_long")
        errors = page_errors(d)
        if _assets_refused(url):
            # gradio 3 refuses every file= asset under a hidden folder (~/.cache/...), the WebUI's own
            # too: there, a refused stylesheet or script says nothing about the extension.
            errors = [e for e in errors if "status of 403" not in e]
        check(not errors, f"tab: no page errors of ours {errors[:2] if errors else ''}")
        return folder
    finally:
        d.quit()


def dataset_steps(d: Any, data: Path, name: str) -> str:
    """Files dropped without a folder, then the dataset's own folder loaded and its captions
    shown; returns the first image's caption (the sample prompt the page offered)."""
    from lora_trainer.data.captions import read_captions

    drop_without_a_folder(d, data, name)
    filled = wait_until("the line about the sample prompt", lambda: [
        line for line in text_of(d, "lt-dataset-summary").splitlines() if "sample prompt" in line])[0]
    first = read_captions(data, None, ".txt")["demo_000.png"]
    check(f"the caption of demo_000.png: '{first}'" in filled, f"tab: the empty sample prompt is the first "
                                                               f"caption ({filled[:70]}...)")
    set_text(d, "lt-f-data-train-data-dir", str(data))
    click(d, "lt-load-dataset")
    wait_until("dataset summary", lambda: "8 images" in text_of(d, "lt-dataset-summary")
               and not text_of(d, "lt-dataset-summary").startswith("added"))
    check(True, f"tab: dataset loaded ({text_of(d, 'lt-dataset-summary').splitlines()[0]})")
    open_tab_section(d, "Captions")
    click(d, "lt-caption-reload")
    wait_until("caption table", lambda: "circle" in text_of(d, "lt-caption-table")
               or "square" in text_of(d, "lt-caption-table"))
    check(True, "tab: captions shown in the table")
    return first


def weight_sweep(d: Any, name: str, shots: Path | None) -> None:
    """The Test section renders the new LoRA at three weights."""
    open_tab_section(d, "Test")
    wait_until("the new LoRA in the Test list", lambda: value_of(d, "lt-test-lora") == name)
    set_text(d, "lt-test-weights", "0, 0.7, 1")
    set_text(d, "lt-test-steps", "3")
    set_text(d, "lt-test-width", "64")
    set_text(d, "lt-test-height", "64")
    click(d, "lt-render")
    wait_until("three test images", lambda: len(images_in(d, "lt-test-grid")) >= 3)
    if shots:
        d.save_screenshot(str(shots / "a1111_test.png"))
    check(True, f"tab: weight sweep rendered ({text_of(d, 'lt-test-msg')})")


def drop_without_a_folder(d: Any, data: Path, name: str) -> None:
    """Images and captions dropped on the Dataset section before a folder is chosen go into a new
    folder named after the LoRA, which the folder field then names and the section shows."""
    from selenium.webdriver.common.by import By

    open_tab_section(d, "Dataset")
    set_text(d, "lt-f-data-train-data-dir", "")
    files = sorted(str(p) for p in data.iterdir())  # the images and their captions
    d.find_element(By.CSS_SELECTOR, "#lt-upload input[type=file]").send_keys("\n".join(files))
    summary = wait_until("the dropped files shown", lambda: (t := text_of(d, "lt-dataset-summary")).startswith("added")
                         and "ready to train" in t and t)
    folder = Path(value_of(d, "lt-f-data-train-data-dir"))
    check(folder.parts[-2:] == ("datasets", name) and len(list(folder.iterdir())) == len(files)
          and "8 images" in summary, f"tab: {len(files)} dropped files went into {folder} and show "
                                     f"({summary.splitlines()[-1][:60]})")


def started(d: Any, name: str) -> None:
    """Start's answer came: the progress line shows the new run, not the one shown before."""
    wait_until(f"'{name}' started", lambda: name in said(d, "lt-train-msg"), every=0.2)  # or already ended: its LoRA


def progress_step(d: Any) -> int:
    import re

    m = re.search(r"step (\d+)/", text_of(d, "lt-progress"))
    return int(m.group(1)) if m else 0


def stop_and_continue(d: Any, name: str) -> None:
    """Stop a long run in the tab, then Continue: it goes on from the step it stopped at."""
    open_tab_section(d, "Train")
    set_text(d, "lt-f-output-output-name", f"{name}_long")
    set_text(d, "lt-f-train-max-train-steps", "400")
    click(d, "lt-start")
    started(d, f"{name}_long")
    wait_until("two steps", lambda: progress_step(d) >= 2, every=0.5)
    click(d, "lt-stop")
    msg = wait_until("the stop's outcome", lambda: (m := said(d, "lt-train-msg")).startswith("stopped at step") and m)
    at = progress_step(d)
    check(f"Continue trains on from step {at}" in msg, f"tab: Stop says how to go on ({msg[:40]}...{msg[-40:]})")
    click(d, "lt-continue")
    wait_until("steps after the stop", lambda: progress_step(d) > at, every=0.5)
    check(f"continuing '{name}_long' from step {at}" in said(d, "lt-train-msg"),
          f"tab: Continue went on from step {at} ({' '.join(text_of(d, 'lt-progress').split())[:60]})")
    click(d, "lt-stop")
    wait_until("stopped again", lambda: said(d, "lt-train-msg").startswith("stopped at step"))


def page_shows_the_run(d: Any, url: str, name: str) -> None:
    """A page loaded again shows the run's settings, and the preset label of those values ("custom":
    the auto preset's, with other steps and batch), not the label the page was built with."""
    d.get(url)
    open_webui_tab(d, "Train LoRA")
    open_tab_section(d, "Train")
    wait_until("the run's settings", lambda: value_of(d, "lt-f-output-output-name") == name)
    check(value_of(d, "lt-preset") == "custom" and value_of(d, "lt-f-train-batch-size") == "2",
          f"tab: a page loaded again shows '{name}''s settings, labelled '{value_of(d, 'lt-preset')}'")


def checkpointed_locon(url: str, data: Path, ckpt: str, plain: np.ndarray) -> None:
    # Half the UNet's blocks checkpointed, LoCon in the residual blocks: every layer trains (the
    # first residual block's inputs need no gradient), and the model comes back unchanged.
    run = train_api(url, data, ckpt, 4, **{"train.gradient_checkpointing": True,
                                          "train.checkpointing_share": 0.5, "network.conv_rank": 4})
    check(run["status"] == "done", f"api: trained with half the blocks checkpointed ({run['status']})")
    from safetensors.torch import load_file

    ups = {k: v for k, v in load_file(run["result"]["lora_path"]).items() if "lora_up" in k}
    still = [k for k, v in ups.items() if not v.abs().sum() > 0]
    # at 64 px the middle block sees one token: its self-attention's softmax is 1 whatever q and k are
    one_token = [k for k in still if "mid_block" in k and ("attn1_to_q" in k or "attn1_to_k" in k)]
    first = [k for k in ups if "down_blocks_0_resnets_0" in k]  # LoCon in the first residual block
    check(bool(first) and still == one_token, f"every lora_up trained but the {len(one_token)} of the one-token "
                                              f"attention ({len(ups)}; first residual block: {len(first)}) {still[:2]}")
    check(differs(txt2img(url, f"a red circle <lora:{ckpt}:1>"), plain) > 0, f"txt2img <lora:{ckpt}:1>")


def kohya_options_and_bf16(url: str, data: Path, tag: str, plain: np.ndarray) -> None:
    from safetensors import safe_open

    # kohya's training options as a lora-scripts user sets them, on the WebUI's torch: LoRA+,
    # Adafactor with a polynomial schedule, pyramid noise, tag dropout, max norm, debiased loss,
    # input perturbation, a random and adaptive noise offset, a Huber loss, caption prefix and
    # kohya's keep-tokens separator, wildcards, v-prediction-like loss weights, a zero-terminal-SNR
    # schedule, alpha masks (the tryout's images are opaque: masks of ones)
    kohya = {"loraplus_lr_ratio": 16, "optimizer_type": "AdaFactor", "lr_scheduler": "polynomial",
             "lr_scheduler_power": 2, "multires_noise_iterations": 4, "caption_tag_dropout_rate": 0.1,
             "shuffle_caption": True, "scale_weight_norms": 1.0, "debiased_estimation_loss": True,
             "training_comment": "tryout", "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True,
             "noise_offset": 0.05, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.005,
             "loss_type": "huber", "huber_schedule": "snr", "huber_c": 0.1, "caption_prefix": "tryout style,",
             "keep_tokens_separator": "|||", "enable_wildcard": True, "v_pred_like_loss": 0.1,
             "zero_terminal_snr": True, "alpha_mask": True, "masked_loss": True}
    run = train_api(url, data, f"kohya_{tag}", 4, **kohya)
    with safe_open(run["result"]["lora_path"], "pt") as f:
        md = f.metadata()
    shown = {k: md.get(k) for k in ("ss_loraplus_lr_ratio", "ss_optimizer", "ss_lr_scheduler", "ss_scale_weight_norms",
                                    "ss_multires_noise_iterations", "ss_training_comment", "ss_ip_noise_gamma",
                                    "ss_adaptive_noise_scale", "ss_loss_type", "ss_huber_schedule",
                                    "ss_zero_terminal_snr", "ss_masked_loss")}
    config = json.loads(md.get("lora_trainer_config") or "{}").get("data", {})
    check(run["status"] == "done" and shown == {
        "ss_loraplus_lr_ratio": "16.0", "ss_optimizer": "adafactor", "ss_lr_scheduler": "polynomial",
        "ss_scale_weight_norms": "1.0", "ss_multires_noise_iterations": "4", "ss_training_comment": "tryout",
        "ss_ip_noise_gamma": "0.1", "ss_adaptive_noise_scale": "0.005", "ss_loss_type": "huber",
        "ss_huber_schedule": "snr", "ss_zero_terminal_snr": "True", "ss_masked_loss": "True"} and (
        config.get("caption_prefix"), config.get("keep_tokens_separator")) == ("tryout style,", "|||"),
          f"api: trained with kohya's LoRA+, Adafactor, polynomial, pyramid noise, tag dropout, max norm, input "
          f"perturbation, adaptive noise offset, Huber loss, caption prefix and separator, wildcards, "
          f"v-prediction-like weights, zero terminal SNR, alpha masks ({shown})")
    check(differs(txt2img(url, f"a red circle <lora:kohya_{tag}:1>"), plain) > 0, f"txt2img <lora:kohya_{tag}:1>")

    # bf16 autocast over the WebUI's model: its GroupNorm32 / LayerNorm layers get our forward for
    # the run (on a GPU: the norms in bf16) and give it back; every block checkpointed, whose
    # recomputation takes the LoRA weights' bf16 copy
    mixed = train_api(url, data, f"bf16_{tag}", 4, **{"train.mixed_precision": "bf16",
                                                     "train.gradient_checkpointing": True})
    check(mixed["status"] == "done", f"api: trained in bf16 mixed precision, every block checkpointed "
                                      f"({mixed['status']})")
    check(differs(txt2img(url, f"a red circle <lora:bf16_{tag}:1>"), plain) > 0, f"txt2img <lora:bf16_{tag}:1>")


def transparent_images(url: str, tag: str, plain: np.ndarray) -> None:
    """Logos on transparent PNGs trained with kohya's alpha_mask: the loss leaves the transparent
    part out, so the LoRA differs from one of the same images without it, and the file says so."""
    from PIL import Image, ImageDraw
    from safetensors.torch import load_file

    data = Path(tempfile.mkdtemp(prefix="lt-tryout-alpha-")) / "logo"
    data.mkdir()
    for i in range(4):
        img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        ImageDraw.Draw(img).ellipse((8 + 4 * i, 8, 40 + 4 * i, 56), fill=(200, 30 + 50 * i, 40, 255))
        img.save(data / f"logo{i}.png")
        (data / f"logo{i}.txt").write_text("a red logo", encoding="utf-8")
    masked = train_api(url, data, f"alpha_{tag}", 4, alpha_mask=True, masked_loss=True)
    whole = train_api(url, data, f"noalpha_{tag}", 4)
    ok = masked["status"] == whole["status"] == "done"
    a, b = (load_file(r["result"]["lora_path"]) for r in (masked, whole)) if ok else ({}, {})
    from safetensors import safe_open

    with safe_open(masked["result"]["lora_path"], "pt") as f:
        said = f.metadata().get("ss_masked_loss")
    check(ok and said == "True" and any(not np.array_equal(v.numpy(), b[k].numpy()) for k, v in a.items()),
          f"api: transparent PNGs trained with alpha_mask (ss_masked_loss {said}); the LoRA differs from the "
          f"same images trained whole")
    check(differs(txt2img(url, f"a red circle <lora:alpha_{tag}:1>"), plain) > 0, f"txt2img <lora:alpha_{tag}:1>")


def lokr_blocks_and_color(url: str, data: Path, tag: str, plain: np.ndarray) -> None:
    """A LoKr with LyCORIS' factor and decompose_both as a lora-scripts user writes them, and a
    LoRA with kohya's block weights and ranks, rank and module dropout, color augmentation and
    random crops: each trains on the WebUI's own model and the WebUI's loader renders it."""
    from safetensors import safe_open

    # A rate that makes 4 steps show in a render; 32 = 8 x 4: lokr_w1 8 x 8 as a rank-2 pair.
    # Asked for in fp16, written in fp32: the WebUI multiplies a LyCORIS pair in the file's dtype,
    # and torch 2.1 has no fp16 matrix product on a CPU (it would skip the layer without a word).
    lokr = train_api(url, data, f"lokr_{tag}", 4, network_module="lycoris.kohya", network_dim=2, network_alpha=2,
                     network_args=["algo=lokr", "factor=8", "decompose_both=True", "rank_dropout=0.1",
                                   "module_dropout=0.1"], learning_rate=5e-2, save_precision="fp16")
    with safe_open(lokr["result"]["lora_path"], "pt") as f:
        keys, args = list(f.keys()), json.loads(f.metadata().get("ss_network_args") or "{}")
        dtypes = {str(f.get_tensor(k).dtype) for k in keys if not k.endswith(".alpha")}
    check(lokr["status"] == "done" and any(k.endswith(".lokr_w1_a") for k in keys)
          and (args.get("algo"), args.get("factor"), args.get("decompose_both")) == ("lokr", "8", "True")
          and args.get("rank_dropout") == "0.1" and dtypes == {"torch.float32"},
          f"api: a LoKr with LyCORIS' factor=8, decompose_both and rank/module dropout trained ({args}), "
          f"written in {sorted(dtypes)} on this CPU WebUI")
    check(differs(txt2img(url, f"a red circle <lora:lokr_{tag}:1>"), plain) > 0, f"txt2img <lora:lokr_{tag}:1>")

    dims = ",".join(["4"] * 12 + ["8"] + ["4"] * 12)
    blocks = train_api(url, data, f"blocks_{tag}", 4, network_args=[
        "down_lr_weight=0,0,0,1,1,1,1,1,1,1,1,1", "mid_lr_weight=2", "up_lr_weight=cosine+0.25",
        f"block_dims={dims}", "rank_dropout=0.1", "module_dropout=0.1"], color_aug=True, random_crop=True)
    with safe_open(blocks["result"]["lora_path"], "pt") as f:
        keys, md = list(f.keys()), f.metadata()
        mid = [f.get_tensor(k).shape[0] for k in keys if "mid_block" in k and k.endswith("lora_down.weight")]
    first = [k for k in keys if "down_blocks_0_" in k]
    dropped = json.loads(md.get("ss_network_args") or "{}").get("module_dropout")
    check(blocks["status"] == "done" and not first and mid and set(mid) == {8} and md.get("ss_color_aug") == "True"
          and dropped == "0.1",
          f"api: block weights (the first down blocks left out: {len(first)} modules), block ranks (mid block rank "
          f"{sorted(set(mid))}), rank and module dropout, color augmentation and random crops trained")
    check(differs(txt2img(url, f"a red circle <lora:blocks_{tag}:1>"), plain) > 0, f"txt2img <lora:blocks_{tag}:1>")


def lycoris_preset(url: str, data: Path, tag: str, plain: np.ndarray) -> None:
    """A LoHa with LyCORIS' full preset from kohya_ss' network_args (its switches left off) trains
    on the WebUI's model; the layers only that preset adds (conv_in, conv_out, the time
    embedding) alone, in a file of their own, change the WebUI's render, so its loader read them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    name = f"loha_full_{tag}"
    run = train_api(url, data, name, 4, network_module="lycoris.kohya", network_dim=2, network_alpha=2,
                    network_args=["preset=full", "conv_dim=2", "conv_alpha=2", "use_tucker=False", "use_scalar=False",
                                  "bypass_mode=False", "rank_dropout_scale=False", "algo=loha", "train_norm=False"],
                    learning_rate=5e-2)
    path = Path(run["result"]["lora_path"])
    with safe_open(path, "pt") as f:
        only = ("lora_unet_conv_in.", "lora_unet_conv_out.", "lora_unet_time_embedding_linear_")
        extra = {k: f.get_tensor(k) for k in f.keys() if k.startswith(only)}
        args = json.loads(f.metadata().get("ss_network_args") or "{}")
    modules = sorted({k.split(".")[0] for k in extra})
    check(run["status"] == "done" and len(modules) == 4 and (args.get("algo"), args.get("preset")) == ("loha", "full"),
          f"api: a LoHa with LyCORIS' preset=full from kohya_ss' network_args trained ({modules})")
    check(differs(txt2img(url, f"a red circle <lora:{name}:1>"), plain) > 0, f"txt2img <lora:{name}:1>")
    save_file(extra, str(path.with_name(f"{name}_io.safetensors")), {"ss_network_args": json.dumps(args)})
    api(url, "/sdapi/v1/refresh-loras", {})
    check(differs(txt2img(url, f"a red circle <lora:{name}_io:1>"), plain) > 0,
          f"txt2img <lora:{name}_io:1>: conv_in, conv_out and the time embedding alone change the render")


def weighted_captions(url: str, data: Path, tag: str) -> None:
    """Captions reach the WebUI's encoder as plain text, brackets and all, unless weighted_captions
    asks for its emphasis: weighted, '(red circle:1.0)' trains exactly as 'red circle' does; plain,
    its brackets are text and the LoRA differs."""
    import shutil

    from safetensors.numpy import load_file

    def folder(caption: str) -> Path:
        out = Path(tempfile.mkdtemp(prefix="lt-tryout-captions-"))
        for image in sorted(data.glob("*.png")):
            shutil.copy2(image, out / image.name)
            (out / image.name).with_suffix(".txt").write_text(caption, encoding="utf-8")
        return out

    plain, brackets = folder("a red circle on grass"), folder("a (red circle:1.0) on grass")
    runs = {name: train_api(url, d, f"{name}_{tag}", 3, weighted_captions=w, save_precision="fp32")
            for name, d, w in [("plain", plain, False), ("weighted", brackets, True), ("literal", brackets, False)]}
    files = {k: load_file(r["result"]["lora_path"]) for k, r in runs.items()}
    same = lambda a, b: a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # noqa: E731
    check(all(r["status"] == "done" for r in runs.values()) and same(files["weighted"], files["plain"])
          and not same(files["literal"], files["plain"]),
          "api: weighted_captions reads '(red circle:1.0)' as 'red circle' (the same LoRA to the bit); without it the "
          "brackets are text the WebUI does not parse (another LoRA)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7861")
    ap.add_argument("--shots", type=Path, help="folder for screenshots of the tab")
    ap.add_argument("--skip-tab", action="store_true", help="only the HTTP API checks")
    args = ap.parse_args(argv)
    from lora_trainer.data.demo import make_demo_dataset

    data = make_demo_dataset(Path(tempfile.mkdtemp(prefix="lt-tryout-data-")) / "shapes", n=8)
    if args.shots:
        args.shots.mkdir(parents=True, exist_ok=True)
    # Names of this run's own (the WebUI's LoRA folder may hold files of earlier tries).
    tag = time.strftime("%m%d%H%M%S")
    tab, stopped, twice, after_name, ckpt = (f"{n}_{tag}" for n in ("tab_lora", "stopped_lora", "twice", "after_render",
                                                                    "checkpointed"))
    plain = txt2img(args.url, "a red circle")
    tab_folder = ""
    if not args.skip_tab:
        tab_folder = tab_flow(args.url, data, args.shots, tab)
    else:
        check(train_api(args.url, data, tab, 6)["status"] == "done", f"api: trained '{tab}'")
    w07, w0 = txt2img(args.url, f"a red circle <lora:{tab}:0.7>"), txt2img(args.url, f"a red circle <lora:{tab}:0>")
    check(differs(w07, plain) > 0, f"txt2img <lora:{tab}:0.7> right after training differs from no LoRA "
                                   f"(mean |diff| {differs(w07, plain):.2f})")
    check(differs(w0, plain) == 0, f"txt2img <lora:{tab}:0> equals no LoRA")

    s = train_api(args.url, data, stopped, 400, stop_at=2)
    check(s["status"] == "stopped" and s["result"]["lora_path"], f"api: a run stopped at step {s['result']['steps']} "
                                                                    f"wrote {Path(s['result']['lora_path']).name}")
    check(differs(txt2img(args.url, f"a red circle <lora:{stopped}:1>"), plain) > 0, "txt2img of the stopped run's LoRA")
    if not args.skip_tab:  # a relative folder is in the WebUI's, which holds the API run's default "output"
        sizes = image_sizes(Path(s["result"]["output_dir"]).parent / tab_folder / "samples" / tab)
        check(sizes == [("step-000006-2.png", (96, 64)), ("step-000006.png", (64, 64))],
              f"tab: each prompt's sample written at its size ({sizes})")
    kept = [line for line in s["state"]["log"] if f"checkpoints/{stopped}/step-" in line]
    check(bool(kept), f"api: the stopped run's checkpoint is kept under its name ({kept[-1] if kept else s['state']['log'][-3:]})")

    first, second = train_api(args.url, data, twice, 4), train_api(args.url, data, twice, 4)
    names = [Path(r["result"]["lora_path"]).stem for r in (first, second)]
    check(first["status"] == second["status"] == "done" and names[0] != names[1],
          f"api: the same name trained twice in a row: {names} (nothing overwritten)")
    from safetensors import safe_open

    with safe_open(first["result"]["lora_path"], "pt") as f:  # no mixed_precision asked: "auto"
        said = f.metadata().get("ss_mixed_precision")
    model_dtype = webui_precision(args.url)
    check(said == model_dtype, f"api: a run without mixed_precision trains in the model's own precision "
                               f"(ss_mixed_precision {said}, the WebUI's model: {model_dtype})")
    check(differs(txt2img(args.url, f"a red circle <lora:{names[1]}:1>"), plain) > 0, f"txt2img <lora:{names[1]}:1>")

    # Two sample prompts, a line each with its own kohya options: each is rendered at every sample step
    prompts = "a red circle\na blue square --w 96 --h 64 --d 3 --n blurry"
    run = train_api(args.url, data, f"prompts_{tag}", 4, **{"sample.prompt": prompts, "sample.every_n_steps": 2,
                                                           "sample.steps": 3})
    found = image_sizes(Path(run["result"]["output_dir"]) / "samples" / f"prompts_{tag}")
    check(found == [("step-000002-2.png", (96, 64)), ("step-000002.png", (64, 64)), ("step-000004-2.png", (96, 64)),
                    ("step-000004.png", (64, 64))], f"api: each sample prompt rendered at steps 2 and 4 at its own "
                                                    f"size ({found})")

    checkpointed_locon(args.url, data, ckpt, plain)

    kohya_options_and_bf16(args.url, data, tag, plain)
    transparent_images(args.url, tag, plain)
    lokr_blocks_and_color(args.url, data, tag, plain)
    lycoris_preset(args.url, data, tag, plain)
    weighted_captions(args.url, data, tag)

    busy_queue(args.url, data, f"behind_{tag}")

    txt2img(args.url, f"a red circle <lora:{tab}:1>")  # the WebUI merges this LoRA into the weights
    after = train_api(args.url, data, after_name, 4)
    check(after["status"] == "done", "api: trained right after a render that used another LoRA")
    check(differs(txt2img(args.url, f"a red circle <lora:{after_name}:1>"), plain) > 0, f"txt2img <lora:{after_name}:1>")
    check(differs(txt2img(args.url, "a red circle"), plain) == 0,
          "a plain render after all of it equals the one before any training (the model is unchanged)")
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
