"""Cut one time window out of decoded audio and resample it, keeping track of which output
samples hold real audio (the rest is zero padding: audio shorter than the video, a file cut
short, packets that failed to decode)."""

import math

import numpy as np
import torch
import torchaudio.functional

# Real neighbours on both sides of the window, so the resampling filter (torchaudio's default
# is 6 zero crossings, well under a millisecond) sees the signal, not zeros, at the edges.
MARGIN_SECONDS = 0.01
# A frame whose timestamp is within this of where the previous frame ended continues it sample
# for sample. Matroska/WebM store timestamps in whole milliseconds, so consecutive AAC frames
# (1024 samples: 21.33 ms at 48 kHz) are each up to 0.5 ms off; placed by their timestamps they
# would leave holes and overlaps in the middle of real audio. Farther off is a real gap or jump
# (as FFmpeg's aresample=async re-syncs only past a threshold).
CONTIGUOUS_SECONDS = 0.001


class AudioWindow:
    """Audio in [start, start + seconds) on the source timeline, at rate_out.

    Feed decoded frames (already in the target channel layout) with `add`; `result` returns
    (float32 (channels, round(seconds * rate_out)), bool mask of the same length).
    Samples past `stream_end` (the declared end of the audio stream) are encoder padding (AAC
    pads its last frame) and are not counted as real audio.
    """

    def __init__(self, start: float, seconds: float, rate_in: int, rate_out: int, channels: int,
                 stream_end: float | None):
        self.rate_in, self.rate_out = rate_in, rate_out
        common = math.gcd(rate_in, rate_out)
        # One input period of step_in samples spans exactly step_out output samples, so a margin
        # of whole periods keeps output sample j at time start + j / rate_out exactly.
        self.step_in, self.step_out = rate_in // common, rate_out // common
        periods = math.ceil(MARGIN_SECONDS * rate_in / self.step_in)
        self.margin_in, self.margin_out = periods * self.step_in, periods * self.step_out
        self.num_out = round(seconds * rate_out)
        length = math.ceil(self.num_out * rate_in / rate_out) + 2 * self.margin_in
        self.first = round(start * rate_in) - self.margin_in  # source sample index of buffer[0]
        self.samples = np.zeros((channels, length), np.float32)
        self.real = np.zeros(length, bool)
        self.limit = length if stream_end is None else min(length, round(stream_end * rate_in) - self.first)
        self.reached = 0  # buffer index just past the latest sample seen
        self.tolerance = round(CONTIGUOUS_SECONDS * rate_in)
        self.next: int | None = None  # buffer index where the previous frame ended

    @property
    def done(self) -> bool:
        """Nothing later than what has been seen can land in the window."""
        return self.reached >= self.limit

    def add(self, samples: np.ndarray, time: float) -> None:
        """samples: float (channels, n) starting at `time` seconds on the source timeline."""
        begin = round(time * self.rate_in) - self.first
        if self.next is not None and abs(begin - self.next) <= self.tolerance:
            begin = self.next  # the previous frame's continuation; its timestamp was rounded
        end = begin + samples.shape[1]
        self.next = end
        self.reached = max(self.reached, end)
        lo, hi = max(0, begin), min(self.limit, end)
        if hi > lo:
            self.samples[:, lo:hi] = samples[:, lo - begin : hi - begin]
            self.real[lo:hi] = True

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        waveform = torch.from_numpy(self.samples)
        if self.rate_in != self.rate_out:
            waveform = torchaudio.functional.resample(waveform, self.rate_in, self.rate_out)
        audio = waveform[:, self.margin_out : self.margin_out + self.num_out].numpy()
        source_index = self.margin_in + (np.arange(self.num_out) * self.step_in) // self.step_out
        mask = self.real[source_index]
        # Exact zeros where there was no audio (the filter rings a little into the padding).
        audio = np.where(mask[None, :], audio, 0.0).astype(np.float32)
        return audio, mask
