"""``python -m lora_trainer caption``: caption a folder, and ``caption tags``: edit its tags."""

from __future__ import annotations

import argparse
import sys

from lora_trainer.caption import tags as tagtools
from lora_trainer.caption.blip import BlipOptions
from lora_trainer.caption.clip import TERM_LISTS, ClipOptions
from lora_trainer.caption.run import FORMATS, MODELS, MODES, caption_folder, edit_captions
from lora_trainer.families import DEFAULT_FAMILY, family_names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_trainer caption",
        description="Caption every image in a folder with BLIP and/or CLIP terms (offline). "
                    "Tag tools: 'python -m lora_trainer caption tags --help'.")
    p.add_argument("--input", required=True, help="image folder (searched recursively)")
    p.add_argument("--model", choices=MODELS, default="blip", help="blip: a sentence; clip: terms from our "
                   "lists; both: the BLIP sentence followed by CLIP terms (default blip)")
    p.add_argument("--format", choices=FORMATS, default="csv", help="metadata.csv, .txt sidecars, or both")
    p.add_argument("--mode", choices=MODES, default="overwrite",
                   help="replace captions, append to them, or leave captioned images alone")
    p.add_argument("--trigger", default=None, help="trigger word put first in every caption (once)")
    p.add_argument("--prefix", default="", help="text put before each generated caption")
    p.add_argument("--suffix", default="", help="text put after each generated caption")
    p.add_argument("--dry-run", action="store_true", help="show the captions, write nothing")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--metadata", "--output", dest="metadata", default=None,
                   help="CSV path (default INPUT/metadata.csv); --output is lora-scripts' name for it")
    p.add_argument("--extension", default=".txt", help="sidecar extension (default .txt)")
    b = p.add_argument_group("BLIP")
    b.add_argument("--blip-model", default="base", help="base, large, a Hugging Face id in the cache, "
                   "or a local folder with the model")
    b.add_argument("--blip-prompt", default="", help="text BLIP continues, e.g. 'a photo of'")
    b.add_argument("--beams", type=int, default=3, help="beam search width (default 3)")
    b.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    b.add_argument("--top-p", type=float, default=0.9)
    b.add_argument("--min-length", type=int, default=5)
    b.add_argument("--max-length", type=int, default=40)
    p.add_argument("--no-fp16", action="store_true", help="full precision on CUDA (BLIP and CLIP)")
    c = p.add_argument_group("CLIP")
    c.add_argument("--clip-model", default="auto", help="auto (matches --family), ViT-L-14, "
                   "ViT-bigG-14/laion2b_s39b_b160k, ... or a folder with open_clip_config.json")
    c.add_argument("--clip-weights", default=None, help="weights file for --clip-model")
    c.add_argument("--family", choices=family_names(), default=DEFAULT_FAMILY, help="base model family")
    c.add_argument("--top-k", type=int, default=1, help="terms kept per list (default 1)")
    c.add_argument("--min-score", type=float, default=0.2, help="cosine similarity a term needs (default 0.2)")
    c.add_argument("--lists", default=",".join(TERM_LISTS), help="comma-separated list names or .txt paths")
    return p


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, current: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="img", desc=desc, file=sys.stderr)
        bar.n = done
        bar.set_postfix_str(current[-40:], refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def main(argv: list[str]) -> int:
    if argv and argv[0] == "tags":
        return tags_main(argv[1:])
    a = build_parser().parse_args(argv)
    blip = BlipOptions(model=a.blip_model, device=a.device, num_beams=a.beams, sample=a.sample, top_p=a.top_p,
                       min_length=a.min_length, max_length=a.max_length, prompt=a.blip_prompt, fp16=not a.no_fp16)
    clip = ClipOptions(model=a.clip_model, family=a.family, weights=a.clip_weights, device=a.device,
                       top_k=a.top_k, min_score=a.min_score, fp16=not a.no_fp16,
                       lists=tuple(x.strip() for x in a.lists.split(",") if x.strip()))
    report = caption_folder(a.input, model=a.model, fmt=a.format, trigger=a.trigger, prefix=a.prefix,
                            suffix=a.suffix, mode=a.mode, dry_run=a.dry_run, batch_size=a.batch_size,
                            progress=_progress_bar("captioning"), blip=blip, clip=clip,
                            metadata_path=a.metadata, extension=a.extension)
    if a.dry_run:
        for rel, text in sorted(report.captions.items()):
            print(f"{rel}: {text}")
    print(report.summary())
    return 0


def build_tags_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_trainer caption tags",
                                description="Edit the comma-separated tags of a folder's captions. "
                                            "Operations run in the order listed here.")
    p.add_argument("--input", required=True, help="image folder")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: csv if metadata.csv exists, else txt")
    p.add_argument("--metadata", default=None)
    p.add_argument("--extension", default=".txt")
    p.add_argument("--replace", nargs=2, metavar=("OLD", "NEW"), action="append", default=[],
                   help="replace tag OLD with NEW (repeatable; NEW '' removes)")
    p.add_argument("--regex", action="store_true", help="OLD is a regular expression")
    p.add_argument("--anywhere", action="store_true", help="match inside tags/text, not whole tags only")
    p.add_argument("--remove", action="append", default=[], metavar="TAG", help="remove a tag everywhere")
    p.add_argument("--dedupe", action="store_true", help="drop repeated tags within a caption")
    p.add_argument("--add-trigger", default=None, metavar="WORD", help="put WORD first in every caption")
    p.add_argument("--sort", action="store_true", help="sort tags alphabetically (trigger stays first)")
    p.add_argument("--keep-first", type=int, default=0, help="tags left in place by --sort")
    p.add_argument("--freq", nargs="?", type=int, const=50, default=None, metavar="N",
                   help="print the N most frequent tags (after the edits)")
    p.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")
    return p


def tags_main(argv: list[str]) -> int:
    a = build_tags_parser().parse_args(argv)

    def edit(captions: dict[str, str]) -> dict[str, str]:
        for old, new in a.replace:
            captions = tagtools.find_replace(captions, old, new, regex=a.regex, whole_tag=not a.anywhere)
        for tag in a.remove:
            captions = tagtools.remove_tag(captions, tag)
        if a.dedupe:
            captions = tagtools.dedupe_tags(captions)
        if a.add_trigger:
            captions = tagtools.add_trigger(captions, a.add_trigger)
        if a.sort:
            keep = max(a.keep_first, 1 if a.add_trigger else 0)
            captions = tagtools.sort_tags(captions, keep_first=keep)
        return captions

    before, after, backups = edit_captions(a.input, edit, a.format, a.dry_run, a.metadata, a.extension)
    names = tagtools.changed(before, after)
    if a.dry_run:
        for name in names:
            print(f"{name}:\n  - {before.get(name, '')}\n  + {after[name]}")
    if a.freq is not None:
        print(tagtools.format_frequency(tagtools.tag_frequency(after), len(after), a.freq))
    verb = "would change" if a.dry_run else "changed"
    tail = f"; backups: {len(backups)} file(s) in .backup/" if backups else ""
    print(f"{a.input}: {verb} {len(names)} of {len(after)} caption(s){tail}")
    return 0
