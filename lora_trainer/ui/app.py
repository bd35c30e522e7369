"""``python -m lora_trainer app``: the Train LoRA tab as a standalone web app.

With no ``--model`` it uses the embedded tiny demo model and a small generated dataset, so the
whole flow (dataset, captions, training, test grid) runs on a CPU in about a minute. It binds
127.0.0.1; ``--listen`` (all interfaces) requires ``--auth user:pass``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer.config import TrainConfig, build_config
from lora_trainer.errors import ConfigError
from lora_trainer.threads import add_threads_argument, configure_cpu_threads
from lora_trainer.ui import compat, presets

if TYPE_CHECKING:
    from lora_trainer.caption.blip import Captioner
    from lora_trainer.hosts.base import Host

log = logging.getLogger(__name__)

ASSET_ROOT = Path(__file__).resolve().parents[2]
JS_FILE = ASSET_ROOT / "javascript" / "lora_trainer.js"
CSS_FILE = ASSET_ROOT / "style.css"
DEMO_PROMPT = "a yellow star on a pink background"  # the demo dataset teaches pink; samples show it arrive


def _read_asset(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        # an installed wheel has no javascript/ or style.css: the tab works, only Copy tag is missing
        log.warning("lora-trainer: %s not found; the page runs without it", path)
        return ""


def demo_defaults(data_dir: str | Path, output_dir: str | Path) -> TrainConfig:
    """The newcomer's run: tiny demo model, 64 px, ~30 steps, a sample every 10 steps."""
    values = {**presets.preset_values("cpu (demo)"), "model.base_model": "demo",
              "data.train_data_dir": str(data_dir), "output.output_dir": str(output_dir),
              "output.output_name": "demo_lora", "sample.prompt": DEMO_PROMPT,
              "sample.guidance_scale": 1.0}  # guidance pushes the tiny model's colours past the learned ones
    return build_config(values)


def prepare_demo_data(folder: str | Path) -> Path:
    """Create the demo dataset in ``folder`` unless it already holds images."""
    from lora_trainer.data.captions import list_images

    folder = Path(folder)
    if folder.is_dir() and list_images(folder):
        return folder
    from lora_trainer.data.demo import make_demo_dataset

    return Path(make_demo_dataset(folder))


def create_app(host: Host, data_dir: str | Path | None = None, *, defaults: TrainConfig | None = None,
               captioner: Captioner | None = None, title: str = "LoRA trainer") -> Any:
    """The app page: the Train LoRA tab, plus the Text LoRA section when the llm package has one."""
    from lora_trainer.ui.tab import build_tab

    g = compat.gr()
    if defaults is None:
        defaults = build_config({"data.train_data_dir": str(data_dir or "")})
    css = _read_asset(CSS_FILE)
    with g.Blocks(title=title, analytics_enabled=False, **compat.blocks_kwargs(css)) as app:
        g.Markdown(f"## {title}", elem_id="lt-app-title")
        with g.Tabs(elem_id="lt-app-tabs"):
            with g.Tab("Image LoRA", elem_id="lt-app-image"):
                # a Blocks built inside another is rendered into it (gradio 3.x and later)
                build_tab(host, defaults=defaults, captioner=captioner)
            if importlib.util.find_spec("lora_trainer.llm.ui") is not None:
                from lora_trainer.llm.ui import build_text_lora_section

                with g.Tab("Text LoRA", elem_id="lt-app-text"):
                    build_text_lora_section(g)
        js = _read_asset(JS_FILE)
        if js:
            compat.run_js_on_load(app, js)
    app.lt_css = css  # launch() needs it on gradio 6 (see compat.launch_kwargs)
    return app


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"--auth {value!r}: expected user:password, e.g. --auth alice:s3cret")
    return user, password


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_trainer app", description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", help="base model: diffusers folder or .safetensors checkpoint (default: the demo model)")
    p.add_argument("--data", help="dataset folder (default with the demo model: ./lora_demo/data, created)")
    p.add_argument("--output", help="output folder for LoRA files (default: ./lora_demo/output or ./output)")
    p.add_argument("--port", type=int, default=7861, help="port (default 7861)")
    p.add_argument("--listen", action="store_true", help="listen on all interfaces (needs --auth)")
    p.add_argument("--auth", help="user:password required to open the page")
    p.add_argument("--inbrowser", action="store_true", help="open a browser tab")
    add_threads_argument(p)
    return p


def resolve_args(argv: list[str]) -> tuple[argparse.Namespace, TrainConfig, str, tuple[str, str] | None]:
    """Parse and check the arguments; (args, defaults, server name, auth). ConfigError on misuse."""
    args = build_parser().parse_args(argv)
    auth = parse_auth(args.auth)
    if args.listen and auth is None:
        raise ConfigError("--listen makes the app reachable from other machines; add --auth user:password")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: expected a port number between 1 and 65535")
    if args.model:
        if args.model != "demo" and not Path(args.model).exists():
            raise ConfigError(f"--model {args.model}: no such file or folder")
        defaults = build_config({"model.base_model": args.model, "data.train_data_dir": args.data or "",
                                 "output.output_dir": args.output or "output"})
    else:
        data = Path(args.data or "lora_demo/data")
        defaults = demo_defaults(data, args.output or "lora_demo/output")
    return args, defaults, ("0.0.0.0" if args.listen else "127.0.0.1"), auth


def check_port(server: str, port: int) -> None:
    """ConfigError naming --port when ``port`` is taken (before gradio prints a traceback about it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            s.bind((server, port))
        except OSError:
            raise ConfigError(f"--port {port}: port {port} on {server} is in use (another app, or this one "
                              f"still running?); choose a free one, e.g. --port {port + 1}") from None


def main(argv: list[str]) -> int:
    args, defaults, server, auth = resolve_args(argv)
    check_port(server, args.port)
    configure_cpu_threads(args.threads, small_model=defaults.model.base_model == "demo")
    if defaults.model.base_model == "demo" and defaults.data.train_data_dir:
        prepare_demo_data(defaults.data.train_data_dir)
    from lora_trainer.hosts.standalone import StandaloneHost

    host = StandaloneHost(lora_dir=defaults.output.output_dir)
    app = create_app(host, defaults.data.train_data_dir, defaults=defaults)
    app.queue()
    print(f"LoRA trainer on http://{server}:{args.port} (Ctrl-C to quit)")
    try:
        app.launch(server_name=server, server_port=args.port, auth=auth, inbrowser=args.inbrowser,
                   **compat.launch_kwargs(app.lt_css))
    except OSError as e:  # taken between the check and the launch
        if "port" not in str(e).lower():
            raise
        check_port(server, args.port)
        raise ConfigError(f"--port {args.port}: the port cannot be used ({str(e).splitlines()[0]}); "
                          f"choose another, e.g. --port {args.port + 1}") from None
    return 0
