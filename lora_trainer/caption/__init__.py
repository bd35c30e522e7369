"""Captioning: BLIP captions, CLIP interrogation with shipped term lists, tag tools."""
