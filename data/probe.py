"""Probe a media file before it goes into a shard: open it, demux every video packet (cheap, no
decoding) to catch files cut short, decode the first frame to catch undecodable streams, and
describe what the loader will see. Problems raise SkipSample with the loader's reasons."""

import av

from data.media import audio_stream, open_media, readable_packets, stream_times, video_stream
from data.skips import SkipSample


def probe_media(data: bytes) -> dict:
    """Fields for the sample's json: fps, duration, width/height (as displayed: rotation and
    pixel aspect applied), rotation, codecs, audio_sample_rate/audio_channels (None/0 without
    audio)."""
    with open_media(data) as container:
        video = video_stream(container)
        audio = audio_stream(container)
        times = stream_times(video, container)
        fps = float(video.average_rate or video.guessed_rate or 0) or None
        first_frame, packets, errors, last_error, data_end = None, 0, 0, None, None
        for packet in readable_packets(container, [video]):
            if packet.size:
                packets += 1
                if packet.pts is not None:
                    end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                    data_end = end if data_end is None else max(data_end, end)
            if first_frame is None:
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as error:
                    errors, last_error = errors + 1, error
                    continue
                first_frame = frames[0] if frames else None
        if packets == 0:
            raise SkipSample("zero_frames", "the video stream holds no packets")
        if first_frame is None:
            raise SkipSample("undecodable", f"{errors} of {packets} video packets failed to decode ({last_error})")
        # Packets must reach the declared end, give or take two frames.
        slack = 2 / fps + 0.05 if fps else 0.1
        if times.end is not None and data_end is not None and data_end < times.end - slack:
            raise SkipSample("truncated", f"video data ends at {data_end:.3f} s but the file declares {times.end:.3f} s")

        sample_aspect = float(video.sample_aspect_ratio) if video.sample_aspect_ratio else 1.0
        width, height = round(first_frame.width * sample_aspect), first_frame.height
        rotation = first_frame.rotation
        if round(rotation / 90) % 2:
            width, height = height, width
        duration = times.duration if times.duration is not None else (data_end or 0.0) - times.start
        return {
            "fps": fps,
            "duration": duration,
            "width": width,
            "height": height,
            "rotation": rotation,
            "video_codec": video.codec_context.name,
            "audio_codec": audio.codec_context.name if audio is not None else None,
            "audio_sample_rate": audio.codec_context.sample_rate if audio is not None else None,
            "audio_channels": audio.codec_context.channels if audio is not None else 0,
        }
