"""Stand-in for ``modules/script_callbacks.py`` (v1.10.1): extension callback registration."""

callback_map: dict[str, list] = {"callbacks_ui_tabs": [], "callbacks_ui_settings": [], "callbacks_app_started": [],
                                 "callbacks_model_loaded": []}


def clear_callbacks() -> None:
    for v in callback_map.values():
        v.clear()


def on_ui_tabs(callback, *, name=None) -> None:
    """callback() -> list of (gradio Blocks, tab title, elem_id)."""
    callback_map["callbacks_ui_tabs"].append(callback)


def on_ui_settings(callback, *, name=None) -> None:
    callback_map["callbacks_ui_settings"].append(callback)


def on_app_started(callback, *, name=None) -> None:
    """callback(demo: gr.Blocks | None, app: FastAPI)."""
    callback_map["callbacks_app_started"].append(callback)


def on_model_loaded(callback, *, name=None) -> None:
    callback_map["callbacks_model_loaded"].append(callback)


def ui_tabs_callback() -> list:
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        res += c() or []
    return res


def ui_settings_callback() -> None:
    for c in callback_map["callbacks_ui_settings"]:
        c()


def app_started_callback(demo, app) -> None:
    for c in callback_map["callbacks_app_started"]:
        c(demo, app)
