"""CLIP interrogation with open_clip: rank our shipped term lists against each image.

The encoder matches the base model family (SD1: ViT-L-14 openai, SD2: ViT-H-14 laion2b, SDXL:
ViT-L-14 openai, or ViT-bigG-14 on request). Weights come from ``--clip-weights PATH``, a folder
with ``open_clip_config.json`` + weights, ``<cache>/models/clip/<name>-<tag>.safetensors``, or
the caches open_clip itself downloads into — never from the network. Term lists are plain text
files in ``terms/``; their text embeddings are computed once per model and list content and
kept on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from lora_trainer.caption.blip import models_dir, resolve_device
from lora_trainer.errors import ConfigError, ModelLoadError, ModelMissingError
from lora_trainer.families import DEFAULT_FAMILY, family_names, get_family
from lora_trainer.fsutil import atomic_path
from lora_trainer.models.tokenizer import cache_root

log = logging.getLogger(__name__)

TERMS_DIR = Path(__file__).parent / "terms"
TERM_LISTS = ("medium", "style", "lighting", "colour", "composition", "quality")
DEFAULT_TAGS = {"ViT-L-14": "openai", "ViT-H-14": "laion2b_s32b_b79k", "ViT-bigG-14": "laion2b_s39b_b160k"}
HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass
class ClipOptions:
    """Which CLIP to load and how many terms to keep."""

    model: str = "auto"  # "auto" (by family), "ViT-L-14", "ViT-bigG-14/laion2b_s39b_b160k", or a folder
    family: str = DEFAULT_FAMILY  # base model family for "auto" (its clip_caption_model): sd1, sd2, sdxl, ...
    weights: str | None = None  # a weights file for the named architecture
    device: str = "auto"
    top_k: int = 1  # best terms kept per list
    min_score: float = 0.2  # cosine similarity a term needs to be kept
    lists: tuple[str, ...] = TERM_LISTS  # shipped list names, or paths to your own .txt lists
    batch_size: int = 64  # term texts per text-encoder batch
    fp16: bool = True  # half precision on CUDA (ignored on CPU)

    def __post_init__(self) -> None:
        if self.family not in family_names():
            raise ConfigError(f"CLIP family {self.family!r}: expected one of {', '.join(family_names())}")
        if self.top_k < 1:
            raise ConfigError(f"CLIP top_k must be 1 or more, got {self.top_k}")


@dataclass
class ClipSpec:
    """A resolved CLIP: what to pass to open_clip, and a key naming the exact weights."""

    name: str  # open_clip model name, or "local-dir:<folder>"
    tag: str
    checkpoint: str | None
    quick_gelu: bool = False
    key: str = field(default="")


def load_term_list(name: str) -> list[str]:
    """Terms of a shipped list (``medium``) or of a text file, one per line, ``#`` comments."""
    path = Path(name)
    if path.suffix != ".txt":
        path = TERMS_DIR / f"{name}.txt"
    if not path.is_file():
        shipped = ", ".join(TERM_LISTS)
        raise ConfigError(f"term list {name!r} not found: use one of {shipped} or the path of a .txt file")
    terms = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    terms = list(dict.fromkeys(t for t in terms if t and not t.startswith("#")))
    if not terms:
        raise ConfigError(f"{path}: the term list is empty; put one term per line")
    return terms


def _file_key(path: str | Path) -> str:
    st = Path(path).stat()
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _hf_cached(repo_hub: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    # open_clip writes "org/repo/" (default file names) or "org/repo/file.bin".
    repo, filename = os.path.split(repo_hub)
    for fname in ([filename] if filename else []) + list(HF_FILES):
        found = try_to_load_from_cache(repo, fname)
        if isinstance(found, str):
            return found
    return None


def _local_dir_spec(folder: Path, weights: str | None) -> ClipSpec:
    if not (folder / "open_clip_config.json").is_file():
        raise ModelLoadError(f"{folder}: no open_clip_config.json here; fix --clip-model or pass a model name")
    if weights:
        raise ConfigError("--clip-weights goes with a model name (ViT-L-14), not with a model folder")
    found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth", "*.pt") for p in folder.glob(ext))
    if not found:
        raise ModelLoadError(f"{folder}: CLIP weights missing; put open_clip_model.safetensors in that folder")
    return ClipSpec(f"local-dir:{folder}", "local", str(found[0]), key=_file_key(found[0]))


def resolve_clip(options: ClipOptions) -> ClipSpec:
    """Find the CLIP weights offline; ModelLoadError names what is missing and where it goes."""
    import open_clip

    spec = get_family(options.family).clip_caption_model if options.model in ("", "auto") else options.model
    if Path(spec).expanduser().is_dir():
        return _local_dir_spec(Path(spec).expanduser(), options.weights)
    name, _, tag = spec.partition("/")
    if name not in open_clip.list_models():
        raise ConfigError(f"--clip-model {name!r} is not an open_clip model (try ViT-L-14, ViT-H-14, ViT-bigG-14) "
                          f"or a folder with open_clip_config.json")
    tags = open_clip.list_pretrained_tags_by_model(name)
    tag = tag or DEFAULT_TAGS.get(name) or (tags[0] if tags else "")
    pcfg = open_clip.get_pretrained_cfg(name, tag) or {}
    # OpenAI's weights need QuickGELU; open_clip 3 says so in the pretrained config, 2.x (the
    # A1111 WebUI's) knew it from the "openai" tag alone.
    quick_gelu = bool(pcfg.get("quick_gelu", tag == "openai"))
    if options.weights:
        path = Path(options.weights).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{path}: CLIP weights file not found; fix --clip-weights PATH")
        return ClipSpec(name, tag, str(path), quick_gelu, _file_key(path))
    ours = models_dir() / "clip"
    for ext in (".safetensors", ".bin", ".pt"):
        candidate = ours / f"{name}-{tag}{ext}"
        if candidate.is_file():
            return ClipSpec(name, tag, str(candidate), quick_gelu, _file_key(candidate))
    cached = _hf_cached(pcfg["hf_hub"]) if pcfg.get("hf_hub") else None
    if cached is None and pcfg.get("url"):
        legacy = Path.home() / ".cache" / "clip" / os.path.basename(pcfg["url"])
        cached = str(legacy) if legacy.is_file() else None
    if cached:
        return ClipSpec(name, tag, cached, quick_gelu, _file_key(cached))
    where = f"https://huggingface.co/{pcfg['hf_hub'].rstrip('/')}" if pcfg.get("hf_hub") else "the open_clip release"
    raise ModelMissingError(f"CLIP weights {name} ({tag}) are not on this machine: put open_clip_model.safetensors "
                            f"from {where} at {ours / f'{name}-{tag}.safetensors'}", "--clip-weights PATH")


def load_clip(options: ClipOptions | None = None) -> ClipInterrogator:
    """Load the CLIP interrogator (offline)."""
    import open_clip

    options = options or ClipOptions()
    spec = resolve_clip(options)
    device = resolve_device(options.device)
    precision = "fp16" if options.fp16 and device.startswith("cuda") else "fp32"
    try:
        if not hasattr(open_clip.factory, "LOCAL_DIR_PREFIX"):
            model, preprocess, tokenizer = _create_with_old_open_clip(spec, device, precision)
        else:
            if spec.name.startswith("local-dir:"):
                model, _, preprocess = open_clip.create_model_and_transforms(spec.name, device=device,
                                                                             precision=precision)
            else:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.name, pretrained=spec.checkpoint, force_quick_gelu=spec.quick_gelu, device=device,
                    precision=precision)
            tokenizer = open_clip.get_tokenizer(spec.name)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{spec.checkpoint}: cannot load as CLIP {spec.name} "
                             f"({str(e).splitlines()[0][:200]}); check --clip-model/--clip-weights") from None
    return ClipInterrogator(model, preprocess, tokenizer, options, device, f"{spec.name}|{spec.tag}|{spec.key}")


def _create_with_old_open_clip(spec: ClipSpec, device: str, precision: str) -> tuple[Any, Any, Any]:
    """open_clip before ``local-dir:`` models (the A1111 WebUI pins 2.20): it reads weights with
    ``torch.load`` only and knows models by registered name. A folder's config is registered under
    a name of its own; the weights (safetensors or a torch file) are read here."""
    import open_clip
    import torch

    name, kwargs = spec.name, {"force_quick_gelu": spec.quick_gelu}
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
        name = "lt-local-" + hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
        registry = cache_root() / "open_clip_configs"
        registry.mkdir(parents=True, exist_ok=True)
        with atomic_path(registry / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(config["model_cfg"]), encoding="utf-8")
        open_clip.add_model_config(registry / f"{name}.json")
        pre = config.get("preprocess_cfg") or {}
        kwargs = {"image_mean": pre.get("mean"), "image_std": pre.get("std")}
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device="cpu",
                                                                 precision="fp32", **kwargs)
    if spec.checkpoint.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(spec.checkpoint)
    else:
        state = torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state)
    model = model.to(device=device, dtype=torch.float16 if precision == "fp16" else torch.float32)
    return model, preprocess, open_clip.get_tokenizer(name)


class ClipInterrogator:
    """Ranks term lists against images; :meth:`caption` joins the kept terms with commas."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, options: ClipOptions,
                 device: str = "cpu", model_key: str = "") -> None:
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.options = options
        self.device = device
        self.model_key = model_key
        self._lists: dict[str, tuple[list[str], Any]] = {}

    def _cache_file(self, list_name: str, terms: list[str]) -> Path:
        digest = hashlib.sha256(json.dumps([self.model_key, terms]).encode("utf-8")).hexdigest()[:24]
        return cache_root() / "clip_terms" / f"{Path(list_name).stem}-{digest}.safetensors"

    def term_embeddings(self, list_name: str) -> tuple[list[str], Any]:
        """(terms, unit-norm embeddings [n, d]) of one list, from the disk cache when present."""
        import torch
        from safetensors.torch import load_file, save_file

        if list_name in self._lists:
            return self._lists[list_name]
        terms = load_term_list(list_name)
        path = self._cache_file(list_name, terms)
        emb = None
        if path.is_file():
            try:
                emb = load_file(str(path))["embeddings"]
            except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
                log.warning("%s: unreadable term cache (%s); rebuilding", path, e)
        if emb is None or emb.shape[0] != len(terms):
            chunks = []
            with torch.inference_mode():
                for i in range(0, len(terms), self.options.batch_size):
                    tokens = self.tokenizer(terms[i:i + self.options.batch_size]).to(self.device)
                    chunks.append(self.model.encode_text(tokens).float())
            emb = torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu().contiguous()
            with atomic_path(path) as tmp:
                save_file({"embeddings": emb}, str(tmp), metadata={"model": self.model_key, "list": list_name})
        self._lists[list_name] = (terms, emb)
        return terms, emb

    def image_embeddings(self, images: list[Image.Image]) -> Any:
        import torch

        pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device)
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            emb = self.model.encode_image(pixels.to(dtype)).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu()

    def rank(self, images: list[Image.Image]) -> list[dict[str, list[tuple[str, float]]]]:
        """Per image: {list name: [(term, score), ...]} best first, top_k above min_score."""
        if not images:
            return []
        img = self.image_embeddings(images)
        out: list[dict[str, list[tuple[str, float]]]] = [{} for _ in images]
        for list_name in self.options.lists:
            terms, emb = self.term_embeddings(list_name)
            scores = img @ emb.T
            k = min(self.options.top_k, len(terms))
            values, idx = scores.topk(k, dim=-1)
            for i in range(len(images)):
                kept = [(terms[j], float(v)) for v, j in zip(values[i].tolist(), idx[i].tolist(), strict=True)
                        if v >= self.options.min_score]
                out[i][list_name] = kept
        return out

    def terms_for(self, images: list[Image.Image]) -> list[list[str]]:
        return [[t for kept in ranked.values() for t, _ in kept] for ranked in self.rank(images)]

    def caption(self, images: list[Image.Image]) -> list[str]:
        return [", ".join(terms) for terms in self.terms_for(images)]
