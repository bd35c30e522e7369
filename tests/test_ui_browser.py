"""The standalone app in headless Chromium, with the demo model: the whole flow a newcomer sees.

Load the dataset, caption it (a tiny BLIP built from config, through the caption package),
edit one caption and find it saved on disk, train, watch the loss plot and a sample appear,
reload the page and find the run (and its settings) again, stop, render the test grid at two
weights — and no page errors. Runs on whatever gradio is installed (CI runs it on the newest and
on 3.41.2). Set LORA_TRAINER_SCREENSHOTS=<folder> to save a PNG of each section there.

Every wait is for something to appear on the page or on disk, never for time to pass: a busy
2-core runner can take minutes where an idle one takes a second. HANG_GUARD only ends a run
that hangs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio")
pytest.importorskip("selenium")

from lora_trainer.ui import screenshots  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]
if screenshots.browser_paths() is None:
    pytestmark.append(pytest.mark.skip(reason="needs chromium and chromium-driver (apt-get install chromium chromium-driver)"))

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red", "blue", "green",
         "circle", "square", "star", "on", "background", "shape", "small", "big"]
SHOTS = os.environ.get("LORA_TRAINER_SCREENSHOTS")
# Seconds: a hung page, not a slow machine (no wait here expects to take long). Lower it to debug.
HANG_GUARD = float(os.environ.get("LORA_TRAINER_HANG_GUARD", "1800"))
EDITED = "a hand written caption, blue star"


def tiny_blip_captioner(folder: Path) -> Any:
    """A real BLIP captioner (caption package, transformers model) with a tiny random model."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from lora_trainer.caption.blip import BlipOptions, load_blip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(folder)  # transformers 5 ignores vocab_file=
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    ids = {w: i for i, w in enumerate(WORDS)}
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text_config={"vocab_size": len(WORDS), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "encoder_hidden_size": 32, "max_position_embeddings": 64,
                     "bos_token_id": ids["[DEC]"], "sep_token_id": ids["[SEP]"], "eos_token_id": ids["[SEP]"],
                     "pad_token_id": ids["[PAD]"]},
        projection_dim=16,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return load_blip(BlipOptions(model=str(folder), device="cpu", num_beams=1, min_length=3, max_length=8))


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from lora_trainer.config import build_config
    from lora_trainer.data.demo import make_demo_dataset
    from lora_trainer.ui import app as appmod

    StandaloneHost = __import__("lora_trainer.hosts.standalone", fromlist=["StandaloneHost"]).StandaloneHost

    root = tmp_path_factory.mktemp("app")
    data = make_demo_dataset(root / "data", n=4)
    (data / "metadata.csv").unlink()  # start uncaptioned: the flow captions it
    # The form starts on another output folder; the flow types root/out before Start, so a
    # reloaded page must take the run's folder from the run, not from the defaults.
    defaults = build_config({"train.max_train_steps": 400, "sample.every_n_steps": 2, "sample.steps": 2,
                             "output.tensorboard": False, "model.device": "cpu"},
                            base=appmod.demo_defaults(data, root / "out-default"))
    app = appmod.create_app(StandaloneHost(lora_dir=root / "out-default"), data, defaults=defaults,
                            captioner=tiny_blip_captioner(root / "blip"))
    url = screenshots.launch(app)
    driver = screenshots.chrome(root / "profile")
    driver.set_window_size(1400, 1600)
    try:
        yield {"driver": driver, "url": url, "data": data, "out": root / "out", "app": app}
    finally:
        driver.quit()
        screenshots.shutdown(app)


# -- page helpers ---------------------------------------------------------------------------

def wait_for(what: str, fn: Callable[[], Any], timeout: float = HANG_GUARD, every: float = 0.5) -> Any:
    """Poll ``fn`` until it returns something true (the event), for at most ``timeout``."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - the element may be re-rendering; try again
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def css(d: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, selector)


def click(d: Any, elem_id: str) -> None:
    el = wait_for(f"#{elem_id}", lambda: [e for e in css(d, f"#{elem_id}") if e.is_displayed()])[0]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    el.click()


# An element that is shown only once its section is open.
SECTION_MARK = {"Dataset": "lt-load-dataset", "Captions": "lt-caption-run", "Train": "lt-start", "Test": "lt-render"}


def displayed(d: Any, elem_id: str) -> bool:
    return any(e.is_displayed() for e in css(d, f"#{elem_id}"))


def open_section(d: Any, name: str) -> None:
    from selenium.webdriver.common.by import By

    def find() -> Any:
        # gradio 4+ marks the tab buttons role=tab (and keeps hidden copies for overflow menus)
        for xpath in (f"//button[@role='tab' and normalize-space()='{name}']", f"//button[normalize-space()='{name}']"):
            found = [b for b in d.find_elements(By.XPATH, xpath) if b.is_displayed()]
            if found:
                return found
        return []

    button = wait_for(f"section tab {name}", find)[0]
    d.execute_script("window.scrollTo(0, 0); arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()
    wait_for(f"section {name} shown", lambda: displayed(d, SECTION_MARK[name]))


def set_text(d: Any, elem_id: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = wait_for(f"input of #{elem_id}", lambda: css(d, f"#{elem_id} textarea, #{elem_id} input"))[0]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text or Keys.BACKSPACE)  # "": the selected text deleted
    box.send_keys(Keys.TAB)


def choose(d: Any, elem_id: str, option: str) -> None:
    """Pick a dropdown option the way a user does: open the list, click the option."""
    from selenium.webdriver.common.by import By

    box = wait_for(f"input of #{elem_id}", lambda: css(d, f"#{elem_id} input"))[0]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    # gradio 4+ labels options (aria-label; the text also holds a check mark), 3.x has the text alone
    xpath = (f"//*[@id='{elem_id}']//ul//li[@aria-label='{option}' or @data-value='{option}'"
             f" or normalize-space()='{option}' or normalize-space(text()[last()])='{option}']")
    item = wait_for(f"option {option}", lambda: [e for e in d.find_elements(By.XPATH, xpath) if e.is_displayed()])[0]
    item.click()
    wait_for(f"{option} chosen", lambda: value_of(d, elem_id) == option)


def value_of(d: Any, elem_id: str) -> str:
    """The value of a textbox or dropdown (its <input>/<textarea>)."""
    boxes = css(d, f"#{elem_id} textarea, #{elem_id} input")
    return (boxes[0].get_attribute("value") or "") if boxes else ""


def text_of(d: Any, elem_id: str) -> str:
    return " ".join(e.text for e in css(d, f"#{elem_id}"))


def said(d: Any, elem_id: str) -> str:
    """The text of a Markdown message, without the queue/progress overlay gradio puts over it."""
    return " ".join(e.text for e in css(d, f"#{elem_id} p"))


def images_in(d: Any, elem_id: str) -> list[Any]:
    return [i for i in css(d, f"#{elem_id} img") if i.get_attribute("src")]


def shot(d: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(Path(SHOTS) / f"ui_{name}.png"))


def page_errors(d: Any) -> list[str]:
    """Uncaught exceptions and console errors (severe) of the page itself.

    Not counted: a missing favicon, and resources on other hosts that an offline machine cannot
    fetch (gradio 3.x asks a CDN and Google Fonts; the page works without them).
    """
    import re

    local = r"(?:127\.0\.0\.1|localhost)"

    def offline_only(m: str) -> bool:
        if "net::ERR_" in m and re.match(rf"https?://(?!{local})", m):
            return True  # a resource on another host that could not be fetched
        return bool(re.search(rf"Unable to preload CSS for https?://(?!{local})", m))

    return [e["message"] for e in d.get_log("browser")
            if e["level"] == "SEVERE" and "favicon" not in e["message"] and not offline_only(e["message"])]


def reopen(d: Any, url: str) -> None:
    """Load the page again. What the old page logs as its open requests are cut off (an aborted
    stream, "Connection errored out") is its own leaving, not a fault: it is dropped on a blank
    page in between, so page_errors sees only what the new page logs."""
    d.get("about:blank")
    d.get_log("browser")
    d.get(url)


def read_captions(data: Path) -> dict[str, str]:
    from lora_trainer.data.captions import read_captions as read

    return read(data)


def table_cell(d: Any, table_id: str, row: int, col: int) -> Any:
    """A body cell: gradio 5+/6 draws grid cells (data-testid cell-R-C), 3.x/4.x a <table>."""
    cells = css(d, f"#{table_id} [data-testid='cell-{row}-{col}']")
    if cells:
        return cells[0]
    return css(d, f"#{table_id} tbody tr")[row].find_elements("css selector", "td")[col]


def edit_cell(d: Any, table_id: str, row: int, col: int, text: str) -> None:
    """Double-click a table cell, replace its text, press Enter (how a user edits a caption)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    cell = wait_for("caption cell", lambda: table_cell(d, table_id, row, col))
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", cell)
    ActionChains(d).double_click(cell).perform()
    box = wait_for("cell editor", lambda: table_cell(d, table_id, row, col).find_elements(
        "css selector", "input, textarea"))[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    wait_for("edited cell", lambda: text in table_cell(d, table_id, row, col).text)


def classes(d: Any, elem_id: str) -> list[str]:
    found = css(d, f"#{elem_id}")
    return (found[0].get_attribute("class") or "").split() if found else []


# What the once-a-second progress poll updates (train_section.py).
POLLED = ("lt-train-msg", "lt-progress", "lt-loss-plot", "lt-loss-smooth-plot", "lt-samples", "lt-log", "lt-test-lora")


def loading_marks(d: Any) -> list[list[str]]:
    """[elem id, mark, how it shows] for each part of the poll's outputs that gradio marks as loading
    (3.x marks all of them, always: the poll is an endless generator there): "generating", an
    outline (border colour and animation), and "min", the room a spinner would take (min-height)."""
    return d.execute_script("""
        const out = [];
        for (const id of arguments[0]) {
          const el = document.getElementById(id);
          if (!el) continue;
          for (const m of [el, ...el.querySelectorAll('.generating, .min')]) {
            const s = getComputedStyle(m);
            if (m.matches('.generating')) out.push([id, 'generating', s.borderTopColor + ' ' + s.animationName]);
            if (m.matches('.min')) out.push([id, 'min', s.minHeight]);
          }
        }
        return out;""", list(POLLED))


def shown_loading_marks(marks: list[list[str]]) -> list[list[str]]:
    """The marks of :func:`loading_marks` that a user sees: an outline, or room kept for a spinner."""
    hidden = {"generating": "rgba(0, 0, 0, 0) none", "min": "0px"}
    return [m for m in marks if m[2] != hidden[m[1]]]


def open_advanced(d: Any) -> None:
    from selenium.webdriver.common.by import By

    if displayed(d, "lt-f-output-output-dir"):
        return
    label = wait_for("the Advanced accordion", lambda: [e for e in d.find_elements(
        By.XPATH, "//*[@id='lt-advanced']//*[normalize-space(text())='Advanced']") if e.is_displayed()])[0]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", label)
    label.click()
    wait_for("advanced fields", lambda: displayed(d, "lt-f-output-output-dir"))


def log_at_end(d: Any) -> bool:
    """The log box overflows and shows its last line."""
    return bool(d.execute_script(
        "var a = document.querySelector('#lt-log textarea');"
        "return a && a.scrollHeight > a.clientHeight + 4 && a.scrollTop + a.clientHeight >= a.scrollHeight - 4;"))


# -- the flow (one test per stage, in order, sharing the page) ------------------------------

def test_1_dataset_loads(flow: dict[str, Any]):
    d = flow["driver"]
    d.get(flow["url"])
    # the Captions table is filled from the form's folder as the page loads (no "Reload from disk")
    open_section(d, "Captions")
    wait_for("caption table rows", lambda: "demo_003.png" in text_of(d, "lt-caption-table"))
    open_section(d, "Dataset")
    click(d, "lt-load-dataset")
    wait_for("4 thumbnails", lambda: len(images_in(d, "lt-dataset-gallery")) >= 4)
    summary = wait_for("summary", lambda: "images" in text_of(d, "lt-dataset-summary") and text_of(d, "lt-dataset-summary"))
    assert "4 no caption" in summary  # metadata.csv was removed: validation says so
    assert page_errors(d) == []


def test_2_caption_edit_and_save(flow: dict[str, Any]):
    d, data = flow["driver"], flow["data"]
    open_section(d, "Captions")
    click(d, "lt-caption-run")
    wait_for("captioning done", lambda: "captioned" in text_of(d, "lt-caption-status"))
    on_disk = read_captions(data)
    assert sorted(on_disk) == [f"demo_00{i}.png" for i in range(4)]
    assert all(c.strip() for c in on_disk.values()), on_disk
    edit_cell(d, "lt-caption-table", 1, 1, EDITED)

    def saved() -> bool:
        # the table hands an edit to the page's state asynchronously: a Save pressed before it
        # lands writes (and shows again) the old text, so edit and press again until the file has it
        if EDITED not in table_cell(d, "lt-caption-table", 1, 1).text:
            edit_cell(d, "lt-caption-table", 1, 1, EDITED)
        click(d, "lt-caption-save")
        wait_for("saved", lambda: "saved 4 captions" in text_of(d, "lt-caption-status"))
        return read_captions(data).get("demo_001.png") == EDITED

    wait_for("the edited caption on disk", saved)
    assert any((data / ".backup").iterdir())  # the captioned file was backed up before the edit
    # a table of file and caption: no third column to add (gradio 3.x offered "New column")
    assert "New column" not in text_of(d, "lt-caption-table")
    shot(d, "captions")
    # with captions, the dataset view counts every image as trainable and previews the buckets
    open_section(d, "Dataset")
    click(d, "lt-load-dataset")
    wait_for("4 trainable", lambda: "4 images" in text_of(d, "lt-dataset-summary"))
    wait_for("bucket preview", lambda: "64x64" in text_of(d, "lt-buckets"))
    # the preview follows the resolution set in the Train section, not the one of the moment it was loaded
    for res in (128, 64):
        open_section(d, "Train")
        set_text(d, "lt-f-data-resolution", str(res))
        open_section(d, "Dataset")
        wait_for(f"buckets at {res}", lambda res=res: f"{res}x{res}" in text_of(d, "lt-buckets")
                 and f"resolution {res}" in text_of(d, "lt-buckets"))
    shot(d, "dataset")
    assert page_errors(d) == []


def progress_step(d: Any) -> int:
    import re

    m = re.search(r"step (\d+)/", text_of(d, "lt-progress"))
    return int(m.group(1)) if m else 0


def test_3_train_shows_loss_and_samples_and_survives_reload(flow: dict[str, Any]):
    d = flow["driver"]
    open_section(d, "Train")
    assert value_of(d, "lt-preset")  # a preset name or "custom", never blank
    assert "stop" not in classes(d, "lt-stop")  # not red while nothing runs
    assert css(d, "#lt-f-train-max-train-steps input[type=number]")  # a number input like the others
    set_text(d, "lt-f-network-rank", "2")
    open_advanced(d)
    set_text(d, "lt-f-output-output-dir", str(flow["out"]))

    def plot_png() -> bytes:
        el = css(d, "#lt-loss-plot")[0]
        d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        return el.screenshot_as_png

    empty = plot_png()
    click(d, "lt-start")
    wait_for("started", lambda: "started" in text_of(d, "lt-train-msg"))
    assert "idle" not in text_of(d, "lt-progress")  # "starting…" from the moment Start answers
    wait_for("Stop turns red while running", lambda: "stop" in classes(d, "lt-stop"))
    wait_for("first steps", lambda: progress_step(d))
    # The poll's outputs do not look as if loading all the time (gradio 3.x pulsed an accent border
    # around the progress line, the plots, the samples, the log and the Test section's LoRA, and
    # kept a spinner's room under the message and the progress line).
    import gradio

    if gradio.__version__.startswith("3."):
        wait_for("the poll's outputs marked as loading", lambda: {m[1] for m in loading_marks(d)} == {"generating", "min"})
    assert shown_loading_marks(loading_marks(d)) == []
    drawn = wait_for("the loss plot drawn", lambda: (png := plot_png()) != empty and png)
    at_draw = progress_step(d)
    wait_for("more steps", lambda: progress_step(d) > at_draw + 1)
    # the loss plot is redrawn with the new points: its pixels change
    wait_for("the loss plot to move", lambda: plot_png() != drawn)
    wait_for("a sample image", lambda: images_in(d, "lt-samples"))
    wait_for("the log scrolled to its last line", lambda: log_at_end(d))
    shot(d, "train")
    assert page_errors(d) == []
    # closing/reloading the page does not stop the run; the new page shows it again, with its settings
    reopen(d, flow["url"])
    open_section(d, "Train")
    at_reload = wait_for("progress after reload", lambda: progress_step(d))
    wait_for("the run's rank in the form", lambda: value_of(d, "lt-f-network-rank") == "2")
    open_advanced(d)
    wait_for("the run's output folder in the form", lambda: value_of(d, "lt-f-output-output-dir") == str(flow["out"]))
    wait_for("still running after reload", lambda: progress_step(d) > at_reload)
    # "Save now" saves a checkpoint, and with it this step's LoRA for the Test section
    click(d, "lt-save-now")
    wait_for("a step LoRA", lambda: list(flow["out"].glob("demo_lora-step*.safetensors")))
    assert page_errors(d) == []


def test_4_stop_writes_the_lora(flow: dict[str, Any]):
    d, out = flow["driver"], flow["out"]
    click(d, "lt-stop")
    final = wait_for("the run to end", lambda: any(w in text_of(d, "lt-progress") for w in ("stopped", "error", "done"))
                     and text_of(d, "lt-progress"))
    assert "stopped" in final, final
    assert (out / "demo_lora.safetensors").is_file()
    # nothing stale is left: the message says how it ended, no ETA, Stop no longer red
    wait_for("the outcome under Start", lambda: "stopped at step" in text_of(d, "lt-train-msg"))
    assert "stopping" not in text_of(d, "lt-train-msg") and "ETA" not in text_of(d, "lt-progress")
    wait_for("Stop back to grey", lambda: "stop" not in classes(d, "lt-stop"))
    assert page_errors(d) == []
    # Continue takes the stopped run on from the step it stopped at (a fresh run would start at 1)
    stopped_at = progress_step(d)
    assert f"Continue trains on from step {stopped_at}" in text_of(d, "lt-train-msg")
    wait_for("Continue shown", lambda: css(d, "#lt-continue") and css(d, "#lt-continue")[0].is_displayed())
    set_text(d, "lt-f-network-rank", "8")  # the form changed since: Continue keeps the run's own settings
    click(d, "lt-continue")
    wait_for("continuing", lambda: f"continuing 'demo_lora' from step {stopped_at}" in text_of(d, "lt-train-msg"))
    wait_for("the run's rank back in the form", lambda: value_of(d, "lt-f-network-rank") == "2")
    wait_for("steps after the one it stopped at", lambda: progress_step(d) > stopped_at)
    click(d, "lt-stop")
    wait_for("stopped again", lambda: "stopped at step" in text_of(d, "lt-train-msg")
             and progress_step(d) > stopped_at)
    assert [p.name for p in out.glob("demo_lora*.safetensors") if "step" not in p.name] == ["demo_lora.safetensors"]
    assert page_errors(d) == []
    # A page opened on another section gets the run's loss while the plots are hidden; they are
    # drawn at their width once the Train section shows them (gradio 3.x drew them 0 px wide;
    # gradio 5+ builds a section only when it is opened, so there is nothing hidden to wait for).
    reopen(d, flow["url"])
    wait_for("the ended run sent to the page", lambda: d.execute_script(
        "const p = document.querySelector('#lt-progress'); return !p || p.textContent.includes('stopped');"))
    open_section(d, "Train")
    wait_for("the loss plot drawn at its width", lambda: chart_width(d, "lt-loss-plot") > 100)


def test_5_test_grid_at_two_weights(flow: dict[str, Any]):
    d = flow["driver"]
    open_section(d, "Test")
    # the list was refreshed when the run ended, with the new LoRA chosen
    wait_for("LoRA chosen", lambda: value_of(d, "lt-test-lora") == "demo_lora")
    wait_for("tag", lambda: value_of(d, "lt-lora-tag") == "<lora:demo_lora:0.7>")
    set_text(d, "lt-test-weights", "0, 1")
    set_text(d, "lt-test-steps", "2")
    click(d, "lt-render")
    answer = wait_for("the render to answer", lambda: said(d, "lt-test-msg"))
    assert "rendered 2 image(s) of demo_lora" in answer, answer
    wait_for("two images", lambda: len(images_in(d, "lt-test-grid")) >= 2)
    # any saved step renders the same way: choose the step LoRA that "Save now" wrote
    step_lora = next(flow["out"].glob("demo_lora-step*.safetensors")).stem
    choose(d, "lt-test-lora", step_lora)
    wait_for("tag of the step", lambda: value_of(d, "lt-lora-tag") == f"<lora:{step_lora}:0.7>")
    before = said(d, "lt-test-msg")
    click(d, "lt-render")
    answer = wait_for("the step's render to answer", lambda: (m := said(d, "lt-test-msg")) != before and m)
    assert f"rendered 2 image(s) of {step_lora}" in answer, answer
    assert len(images_in(d, "lt-test-grid")) >= 2
    click(d, "lt-copy-tag")  # runs the page script; an error there would show in the log
    # the toast lasts 1.8 s, which a busy machine may miss: the script also marks the message box
    wait_for("copy acknowledged", lambda: "copied" in (css(d, "#lt-test-msg")[0].get_attribute("data-lt-flash") or ""))
    shot(d, "test")
    assert page_errors(d) == []
    # a reloaded page lists the LoRAs of the run's folder, not of the form's default folder
    reopen(d, flow["url"])
    open_section(d, "Test")
    wait_for("the run's LoRA listed after reload", lambda: value_of(d, "lt-test-lora") == "demo_lora")


def test_6_a_preset_says_what_it_set(flow: dict[str, Any]):
    d = flow["driver"]
    reopen(d, flow["url"])
    open_section(d, "Train")
    choose(d, "lt-preset", "8 GB")
    wait_for("the preset's note", lambda: said(d, "lt-train-msg") == "preset 8 GB applied")
    wait_for("its resolution", lambda: value_of(d, "lt-f-data-resolution") == "512")
    choose(d, "lt-preset", "auto")  # no GPU here: the CPU demo settings, and the note says why
    wait_for("auto's note", lambda: said(d, "lt-train-msg") == "auto: no GPU found, so the CPU demo settings")
    wait_for("the demo resolution", lambda: value_of(d, "lt-f-data-resolution") == "64")
    assert page_errors(d) == []


def chart_width(d: Any, elem_id: str) -> float:
    """The width of the widest chart (canvas or svg, not the icons) drawn in a plot."""
    return d.execute_script(
        f"return Math.max(0, ...Array.from(document.querySelectorAll('#{elem_id} canvas, #{elem_id} svg'))"
        ".map(e => e.getBoundingClientRect().width));")
