"""Open media bytes with PyAV and say what is inside, turning FFmpeg failures into skip reasons.
Shared by the shard writer (probing files) and the loader (decoding clips)."""

import io
from collections.abc import Iterator
from dataclasses import dataclass

import av

from data.skips import SkipSample

MEDIA_EXTENSIONS = ("mp4", "mov", "mkv", "webm")
# Leading bytes of the containers we accept. A file that starts like one of these but cannot be
# opened is a broken container (typically an MP4 cut before its index), not a foreign file.
_ISOBMFF_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
_MATROSKA_MAGIC = b"\x1a\x45\xdf\xa3"


def container_kind(data: bytes) -> str | None:
    """'isobmff' (mp4/mov), 'matroska' (mkv/webm) or None, from the first bytes."""
    if data[4:8] in _ISOBMFF_BOXES:
        return "isobmff"
    if data[:4] == _MATROSKA_MAGIC:
        return "matroska"
    return None


def open_media(data: bytes) -> av.container.InputContainer:
    """A PyAV input container over `data`; raises SkipSample('empty'|'not_media'|'truncated')."""
    if not data:
        raise SkipSample("empty", "0 bytes")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as error:
        raise _unreadable(data, f"FFmpeg cannot open it ({error.strerror})") from None
    if not container.streams.video and not container.streams.audio:
        # An MP4 cut before its index (moov) opens with no audio/video streams at all.
        container.close()
        raise _unreadable(data, "FFmpeg finds no audio or video stream in it")
    return container


def _unreadable(data: bytes, why: str) -> SkipSample:
    kind = container_kind(data)
    if kind is not None:
        return SkipSample("truncated", f"{kind} header found but {why}; an MP4 cut before its index looks like this")
    return SkipSample("not_media", f"{why}; first bytes {data[:8]!r}")


@dataclass
class StreamTimes:
    """Where a stream sits on the presentation timeline, in seconds (None when undeclared)."""

    start: float
    duration: float | None

    @property
    def end(self) -> float | None:
        return None if self.duration is None else self.start + self.duration


def stream_times(stream: av.stream.Stream, container: av.container.InputContainer) -> StreamTimes:
    """Declared start and duration of `stream`. Matroska/WebM have no per-stream duration field;
    their muxers write the track's DURATION tag, which is read next: FFmpeg (container ENCODER
    "Lavf...") writes the track's end time there, mkvmerge its duration. The container's
    duration comes last: it spans the longest stream, so audio that outlasts the video would
    make a complete video look cut short."""
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if stream.duration is not None and stream.duration > 0:
        return StreamTimes(start, float(stream.duration * stream.time_base))
    tagged = _duration_tag(stream.metadata)
    if tagged is not None:
        end_time = str(container.metadata.get("ENCODER", "")).startswith("Lavf")
        duration = tagged - start if end_time else tagged
        if duration > 0:
            return StreamTimes(start, duration)
    if container.duration is not None and container.duration > 0:
        return StreamTimes(start, container.duration / av.time_base - start)
    return StreamTimes(start, None)


def _duration_tag(metadata: dict) -> float | None:
    """Seconds in a Matroska track's DURATION tag ("HH:MM:SS.nnnnnnnnn"; mkvmerge may suffix
    the key with a language, DURATION-eng), or None when absent or unreadable."""
    for key, value in metadata.items():
        if key.upper().split("-")[0] == "DURATION":
            try:
                hours, minutes, seconds = value.split(":")
                duration = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
            except ValueError:
                continue
            if duration > 0:
                return duration
    return None


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The first video stream; raises SkipSample('no_video')."""
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise SkipSample("no_video", f"streams: {kinds}")
    return container.streams.video[0]


def audio_stream(container: av.container.InputContainer) -> av.audio.stream.AudioStream | None:
    return container.streams.audio[0] if container.streams.audio else None


def readable_packets(container: av.container.InputContainer, streams: list) -> Iterator[av.Packet]:
    """Demuxed packets until the end of the file or the first container-level read error (a
    file cut short); what was read so far is then judged like any other stream end."""
    packets = container.demux(*streams)
    while True:
        try:
            packet = next(packets)
        except (StopIteration, av.error.FFmpegError):
            return
        yield packet
