"""One raw tar sample (member references) -> one decoded training sample."""

import json
import random

from data.captions import pick_caption
from data.decode import ClipSpec, decode_clip
from data.media import MEDIA_EXTENSIONS
from data.shard_reader import SKIP_KEY
from data.skips import SkipSample


def sample_rng(seed: int, rank: int, worker: int, index: int) -> random.Random:
    """Randomness of one sample (clip window, caption language): fixed by its place in the
    worker's stream, so a resumed stream decodes a replayed sample identically, and a file seen
    again in a later epoch gets a fresh window."""
    return random.Random(f"sample/{seed}/{rank}/{worker}/{index}")


def read_meta(raw: dict) -> dict:
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"].read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SkipSample("bad_json", str(error)) from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"top level is {type(meta).__name__}, expected an object")
    return meta


def decode_sample(raw: dict, spec: ClipSpec, rng: random.Random) -> dict:
    """{'video', 'audio', 'audio_mask', 'caption', 'language', 'key', 'meta', 'clip_start',
    'bucket'}; raises SkipSample."""
    if SKIP_KEY in raw:
        raise raw[SKIP_KEY]
    media_ext = next((ext for ext in MEDIA_EXTENSIONS if ext in raw), None)
    if media_ext is None:
        members = ", ".join(k for k in raw if not k.startswith("__")) or "none"
        raise SkipSample("no_media_member", f"members: {members}")
    meta = read_meta(raw)
    language, caption = pick_caption(meta, rng)
    clip = decode_clip(raw[media_ext].read(), spec, rng)
    return dict(
        video=clip.video,
        audio=clip.audio,
        audio_mask=clip.audio_mask,
        caption=caption,
        language=language,
        key=raw["__key__"],
        meta=meta,
        clip_start=clip.start,
        bucket=clip.bucket,
    )
