"""The one place that knows gradio versions differ (3.41.2 in A1111, 4.40 in Forge, 5.x/6.x standalone).

Everything else in ``lora_trainer.ui`` imports gradio through :func:`gr` and builds the parts that
differ with the helpers below. Where a keyword was renamed or removed, the helper checks the
installed constructor's signature instead of the version number, so point releases in between
work as well.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def gr() -> Any:
    """The gradio module (imported lazily so ``lora_trainer`` imports without it)."""
    import gradio

    return gradio


def version() -> tuple[int, int]:
    parts = gr().__version__.split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@functools.cache
def _params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)


def accepts(cls: type, name: str) -> bool:
    """True when ``cls(...)`` takes the keyword ``name`` in the installed gradio."""
    return name in _params(cls)


def _known(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if accepts(cls, k)}


# -- events ---------------------------------------------------------------------------------

def js_kwargs(code: str | None) -> dict[str, Any]:
    """``_js=`` on gradio 3.x, ``js=`` on 4.x+ (event listeners)."""
    if not code:
        return {}
    return {"_js": code} if version()[0] < 4 else {"js": code}


def run_js_on_load(blocks: Any, code: str) -> None:
    """Run ``code`` (a JS function body) once when the page loads, on every gradio version."""
    blocks.load(None, None, None, **js_kwargs(f"() => {{ {code}\n return []; }}"))


# The class of the components a periodic event updates (style.css).
POLLED = "lt-polled"


def add_timer(blocks: Any, fn: Callable[..., Any], inputs: Sequence[Any], outputs: Sequence[Any],
              seconds: float) -> Any:
    """Call ``fn`` every ``seconds``: ``gr.Timer`` on 4.40+, ``load(every=)`` before that.

    ``fn``'s last input is a State that its last output replaces (what the page has been sent)."""
    g = gr()
    if hasattr(g, "Timer"):
        timer = g.Timer(seconds)
        timer.tick(fn, list(inputs), list(outputs), show_progress="hidden")
        return timer
    # gradio 3.x: periodic load events need the queue, which the app and the WebUI enable. They
    # call fn again and again with the inputs of the first call, so a State input never changes:
    # the loop below carries fn's memory from one call to the next itself. Such an event is a
    # generator that never ends, and gradio 3 shows a generator's outputs as loading while it runs
    # (a pulsing accent outline, a spinner's room), whatever show_progress says: style.css hides
    # that on POLLED outputs.
    for c in outputs:  # gradio 3 keeps elem_classes as a list or None
        c.elem_classes = [*(c.elem_classes or []), POLLED]
    return blocks.load(carrying_memory(fn, seconds), list(inputs), list(outputs), every=seconds,
                       show_progress=False)


def carrying_memory(fn: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """A generator function calling ``fn`` every ``seconds``, its last output fed back as its last input."""
    import time

    def loop(*args: Any) -> Any:
        args_ = list(args)
        while True:
            out = fn(*args_)
            args_[-1] = out[-1]
            yield out
            time.sleep(seconds)

    return loop


def update(**kwargs: Any) -> Any:
    """``gr.update`` (present on every supported version; the one place to change if it goes)."""
    return gr().update(**kwargs)


# -- components -----------------------------------------------------------------------------

def textbox(*, copy_button: bool = False, autoscroll: bool | None = None, **kwargs: Any) -> Any:
    """A Textbox; ``show_copy_button`` (<=5.x) or ``buttons=["copy"]`` (6.x); ``autoscroll`` where
    it exists (4.x+; the page script follows the log on 3.x)."""
    g = gr()
    if copy_button:
        if accepts(g.Textbox, "show_copy_button"):
            kwargs["show_copy_button"] = True
        elif accepts(g.Textbox, "buttons"):
            kwargs["buttons"] = ["copy"]
    if autoscroll is not None and accepts(g.Textbox, "autoscroll"):
        kwargs["autoscroll"] = autoscroll
    return g.Textbox(**kwargs)


def dataframe(*, headers: list[str], height: int = 400, **kwargs: Any) -> Any:
    """A table of strings with the headers' columns and no others (no "New column" button);
    ``height=`` (3.x/4.x) or ``max_height=`` (5.x+); ``column_count``/``column_limits`` (6.x) or
    ``col_count=(n, "fixed")``."""
    g = gr()
    if accepts(g.Dataframe, "max_height"):
        kwargs["max_height"] = height
    elif accepts(g.Dataframe, "height"):
        kwargs["height"] = height
    if accepts(g.Dataframe, "column_limits"):
        kwargs.update(column_count=len(headers), column_limits=(len(headers), len(headers)))
    else:
        kwargs["col_count"] = (len(headers), "fixed")
    return g.Dataframe(headers=headers, datatype="str", type="array", **kwargs)


def gallery(*, columns: int = 6, height: int | str | None = None, **kwargs: Any) -> Any:
    """A Gallery with a column count: a constructor keyword on 4.x+, ``.style()`` on 3.x."""
    g = gr()
    layout = {"columns": columns, "height": height, "object_fit": "contain"}
    if accepts(g.Gallery, "columns"):
        kwargs.update({k: v for k, v in layout.items() if v is not None and accepts(g.Gallery, k)})
        return g.Gallery(**kwargs)
    comp = g.Gallery(**kwargs)
    return comp.style(**{k: v for k, v in layout.items() if v is not None})  # gradio 3.x


def empty_frame(columns: Sequence[str]) -> Any:
    """An empty DataFrame with ``columns``: LinePlot breaks on ``None`` in 4.44."""
    import pandas as pd

    return pd.DataFrame({c: [] for c in columns})


def line_plot(*, x: str, y: str, color: str | None = None, **kwargs: Any) -> Any:
    """A LinePlot that fills its box: gradio 3.x draws a Vega-Lite chart of the default 200 px
    width unless told to take the container's ("container"); 4.x+ fill it on their own."""
    g = gr()
    cols = [x, y] + ([color] if color else [])
    if version()[0] < 4:
        kwargs.setdefault("width", "container")
    kwargs = _known(g.LinePlot, {"height": kwargs.pop("height", 260), **kwargs})
    return g.LinePlot(value=empty_frame(cols), x=x, y=y, color=color, **kwargs)


def file_path(obj: Any) -> str | None:
    """The path of an uploaded file: str/Path (4.x+), NamedString or tempfile wrapper (``.name``),
    or a dict with ``name``/``path`` (some 3.x/4.x payloads)."""
    if obj is None:
        return None
    if isinstance(obj, (str, Path)):
        return str(obj)
    if isinstance(obj, dict):
        return obj.get("path") or obj.get("name")
    name = getattr(obj, "name", None)
    return str(name) if name else None


def file_paths(objs: Any) -> list[str]:
    if objs is None:
        return []
    if not isinstance(objs, (list, tuple)):
        objs = [objs]
    return [p for p in (file_path(o) for o in objs) if p]


# -- page assets (css / head) ---------------------------------------------------------------

def blocks_kwargs(css: str | None) -> dict[str, Any]:
    """Keywords for ``gr.Blocks(...)``: css goes there before 6.0 (it moved to launch())."""
    if css and version()[0] < 6:
        return {"css": css}
    return {}


def launch_kwargs(css: str | None) -> dict[str, Any]:
    """Keywords for ``Blocks.launch(...)`` carrying what :func:`blocks_kwargs` could not."""
    if css and version()[0] >= 6:
        return {"css": css}
    return {}
