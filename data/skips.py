"""Why a sample was not used. Every skip has one of these reasons, is counted per reason, and the
counts travel with the batches (data/state.py) so the training loop can log them."""

# reason -> what it means and what to do; the text goes into warnings and the shard report.
REASONS = {
    "empty": "the media file has 0 bytes; re-export or remove it",
    "not_media": "the bytes are not a video container FFmpeg recognises; check the file type",
    "truncated": "the container is cut short (index missing or data ends before its declared duration); re-download or re-export it",
    "no_video": "the container has no video stream; audio-only files cannot be used",
    "zero_frames": "the video stream holds no frames; re-export the file",
    "undecodable": "the video stream's data cannot be decoded; re-encode the file",
    "too_short": "the clip is shorter than the requested clip_seconds; lower clip_seconds or drop the file",
    "no_audio": "the file has no audio track and missing_audio='skip'; set missing_audio='silence' to keep it",
    "no_caption": "no caption was found for the sample (json 'captions'/'caption', sidecar .txt/.json or CSV row)",
    "bad_json": "the sample's .json member is not valid UTF-8 JSON; rewrite the shard",
    "no_media_member": "the tar sample has no .mp4/.mov/.mkv/.webm member; rewrite the shard",
    "bad_shard": "the tar shard cannot be read past this point (truncated or corrupt tar); rewrite the shard",
    "decode_error": "an unexpected error while decoding; see the logged message",
}


class SkipSample(Exception):
    """Raised by decoding and probing to drop one sample. `reason` is a key of REASONS;
    `detail` says what exactly was wrong with this file."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to data.skips.REASONS")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def describe(self, where: str) -> str:
        """One line naming the sample, what was wrong and what to do."""
        detail = f" ({self.detail})" if self.detail else ""
        return f"skipped {where}: {self.reason}{detail}; {REASONS[self.reason]}"
