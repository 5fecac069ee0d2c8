"""Captions in a sample's json: {'captions': {language: text, ...}} (what the writers produce),
or the looser {'caption': text, 'language': code} that hand-made json often has."""

import random

from data.skips import SkipSample

UNKNOWN_LANGUAGE = "und"  # ISO 639-2 "undetermined"


def captions_of(meta: dict) -> dict[str, str]:
    """language -> caption; empty captions and values that are not text (null, lists) dropped."""
    captions = meta.get("captions")
    if isinstance(captions, dict):
        found = {str(lang): text.strip() for lang, text in captions.items() if isinstance(text, str)}
    elif isinstance(meta.get("caption"), str):
        found = {str(meta.get("language") or UNKNOWN_LANGUAGE): meta["caption"].strip()}
    else:
        found = {}
    return {lang: text for lang, text in found.items() if text}


def pick_caption(meta: dict, rng: random.Random) -> tuple[str, str]:
    """(language, caption), one language drawn from `rng` among those present."""
    captions = captions_of(meta)
    if not captions:
        raise SkipSample("no_caption", "json has neither 'captions' {language: text} nor 'caption' text")
    language = rng.choice(sorted(captions))
    return language, captions[language]
