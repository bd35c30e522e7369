"""The standalone app in headless Chromium, with the demo model: the whole flow a newcomer sees.

Load the dataset, caption it (a tiny BLIP built from config, through the caption package),
edit one caption and find it saved on disk, train, watch the loss plot and a sample appear,
reload the page and find the run again, stop, render the test grid at two weights — and no
page errors. Runs on whatever gradio is installed (CI runs it on the newest and on 3.41.2).
Set LORA_TRAINER_SCREENSHOTS=<folder> to save a PNG of each section there.
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
# A busy 2-core machine makes every step slow; these are upper bounds, not expectations.
LONG = 420.0


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
    defaults = build_config({"train.max_train_steps": 400, "sample.every_n_steps": 2, "sample.steps": 2,
                             "output.tensorboard": False, "model.device": "cpu"},
                            base=appmod.demo_defaults(data, root / "out"))
    app = appmod.create_app(StandaloneHost(lora_dir=root / "out"), data, defaults=defaults,
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

def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60.0, every: float = 0.5) -> Any:
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
    time.sleep(0.5)


def set_text(d: Any, elem_id: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = wait_for(f"input of #{elem_id}", lambda: css(d, f"#{elem_id} textarea, #{elem_id} input"))[0]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text)
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
    wait_for(f"{option} chosen", lambda: value_of(d, elem_id) == option, timeout=10)


def value_of(d: Any, elem_id: str) -> str:
    """The value of a textbox or dropdown (its <input>/<textarea>)."""
    boxes = css(d, f"#{elem_id} textarea, #{elem_id} input")
    return (boxes[0].get_attribute("value") or "") if boxes else ""


def text_of(d: Any, elem_id: str) -> str:
    return " ".join(e.text for e in css(d, f"#{elem_id}"))


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
    wait_for("edited cell", lambda: text in table_cell(d, table_id, row, col).text, timeout=10)
    time.sleep(1.5)  # the table hands its new value to the page's state asynchronously


# -- the flow (one test per stage, in order, sharing the page) ------------------------------

def test_1_dataset_loads(flow: dict[str, Any]):
    d = flow["driver"]
    d.get(flow["url"])
    click(d, "lt-load-dataset")
    wait_for("4 thumbnails", lambda: len(images_in(d, "lt-dataset-gallery")) >= 4)
    summary = wait_for("summary", lambda: "images" in text_of(d, "lt-dataset-summary") and text_of(d, "lt-dataset-summary"))
    assert "4 no caption" in summary  # metadata.csv was removed: validation says so
    assert page_errors(d) == []


def test_2_caption_edit_and_save(flow: dict[str, Any]):
    d, data = flow["driver"], flow["data"]
    open_section(d, "Captions")
    click(d, "lt-caption-run")
    wait_for("captioning done", lambda: "captioned" in text_of(d, "lt-caption-status"), timeout=LONG)
    on_disk = read_captions(data)
    assert sorted(on_disk) == [f"demo_00{i}.png" for i in range(4)]
    assert all(c.strip() for c in on_disk.values()), on_disk
    edit_cell(d, "lt-caption-table", 1, 1, "a hand written caption, blue star")
    click(d, "lt-caption-save")
    wait_for("saved", lambda: "saved 4 captions" in text_of(d, "lt-caption-status"))
    assert read_captions(data)["demo_001.png"] == "a hand written caption, blue star"
    assert any((data / ".backup").iterdir())  # the captioned file was backed up before the edit
    shot(d, "captions")
    # with captions, the dataset view counts every image as trainable and previews the buckets
    open_section(d, "Dataset")
    click(d, "lt-load-dataset")
    wait_for("4 trainable", lambda: "4 images" in text_of(d, "lt-dataset-summary"))
    wait_for("bucket preview", lambda: "64x64" in text_of(d, "lt-buckets"))
    shot(d, "dataset")
    assert page_errors(d) == []


def test_3_train_shows_loss_and_samples_and_survives_reload(flow: dict[str, Any]):
    d = flow["driver"]
    open_section(d, "Train")
    click(d, "lt-start")
    wait_for("started", lambda: "started" in text_of(d, "lt-train-msg"))

    def step() -> int:
        import re

        m = re.search(r"step (\d+)/", text_of(d, "lt-progress"))
        return int(m.group(1)) if m else 0

    def plot_png() -> bytes:
        el = css(d, "#lt-loss-plot")[0]
        d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        return el.screenshot_as_png

    first = wait_for("first steps", step, timeout=LONG)
    time.sleep(1.5)  # one poll to draw it
    before = plot_png()
    wait_for("more steps", lambda: step() > first + 1, timeout=LONG)
    # the loss plot is redrawn with the new points: its pixels change
    wait_for("the loss plot to move", lambda: plot_png() != before, timeout=30)
    wait_for("a sample image", lambda: images_in(d, "lt-samples"), timeout=LONG)
    shot(d, "train")
    assert page_errors(d) == []
    # closing/reloading the page does not stop the run; the new page shows it again
    d.get(flow["url"])
    time.sleep(1.0)
    d.get_log("browser")  # drop what the old page logged while its open requests were cut off
    open_section(d, "Train")
    at_reload = wait_for("progress after reload", step, timeout=60)
    wait_for("still running after reload", lambda: step() > at_reload, timeout=LONG)
    # "Save now" saves a checkpoint, and with it this step's LoRA for the Test section
    click(d, "lt-save-now")
    wait_for("a step LoRA", lambda: list(flow["out"].glob("demo_lora-step*.safetensors")), timeout=LONG)
    assert page_errors(d) == []


def test_4_stop_writes_the_lora(flow: dict[str, Any]):
    d, out = flow["driver"], flow["out"]
    click(d, "lt-stop")
    final = wait_for("the run to end", lambda: any(w in text_of(d, "lt-progress") for w in ("stopped", "error", "done"))
                     and text_of(d, "lt-progress"), timeout=LONG)
    assert "stopped" in final, final
    assert (out / "demo_lora.safetensors").is_file()
    assert page_errors(d) == []


def test_5_test_grid_at_two_weights(flow: dict[str, Any]):
    d = flow["driver"]
    open_section(d, "Test")
    # the list was refreshed when the run ended, with the new LoRA chosen
    wait_for("LoRA chosen", lambda: value_of(d, "lt-test-lora") == "demo_lora", timeout=60)
    wait_for("tag", lambda: value_of(d, "lt-lora-tag") == "<lora:demo_lora:0.7>")
    set_text(d, "lt-test-weights", "0, 1")
    set_text(d, "lt-test-steps", "2")
    click(d, "lt-render")
    wait_for("two images", lambda: len(images_in(d, "lt-test-grid")) >= 2, timeout=LONG)
    assert "rendered 2 image(s) of demo_lora" in text_of(d, "lt-test-msg")
    # any saved step renders the same way: choose the step LoRA that "Save now" wrote
    step_lora = next(flow["out"].glob("demo_lora-step*.safetensors")).stem
    choose(d, "lt-test-lora", step_lora)
    wait_for("tag of the step", lambda: value_of(d, "lt-lora-tag") == f"<lora:{step_lora}:0.7>")
    click(d, "lt-render")
    wait_for("the step's grid", lambda: f"rendered 2 image(s) of {step_lora}" in text_of(d, "lt-test-msg"),
             timeout=LONG)
    assert len(images_in(d, "lt-test-grid")) >= 2
    click(d, "lt-copy-tag")  # runs the page script; an error there would show in the log
    wait_for("toast", lambda: css(d, ".lt-toast"), timeout=10)
    shot(d, "test")
    assert page_errors(d) == []
