"""Take frames at a fixed rate by timestamp: the output frame at time t is the source frame on
screen at t (the last one presented at or before t). This works for any source frame rate,
constant or variable, and converts each source frame at most once."""

from collections.abc import Callable

import av
import numpy as np

# Timestamps are rationals turned into floats; two instants closer than this are the same.
TIME_EPSILON = 1e-6


class FramePicker:
    """Feed decoded frames in presentation order with `push`; read `frames` once `done`, or
    call `finish(stream_end)` at end of stream."""

    def __init__(self, targets: list[float], convert: Callable[[av.VideoFrame], np.ndarray]):
        self.targets = targets
        self.convert = convert
        self.frames: list[np.ndarray] = []
        self.last_time: float | None = None
        self.last_end: float | None = None
        self._current: av.VideoFrame | None = None
        self._current_rgb: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return len(self.frames) == len(self.targets)

    def push(self, frame: av.VideoFrame, time: float, duration: float) -> None:
        if self._current is None:
            # A stream whose first frame comes after the window start holds that first frame.
            self._current = frame
        # Every target before this frame's time was showing the current (previous) frame.
        while not self.done and time > self.targets[len(self.frames)] + TIME_EPSILON:
            self._emit()
        if self._current is not frame:
            self._current, self._current_rgb = frame, None
        self.last_time, self.last_end = time, time + duration

    def finish(self) -> bool:
        """End of stream: the last frame stays on screen until its end. True when every target
        got a frame."""
        while not self.done and self.last_end is not None and self.targets[len(self.frames)] < self.last_end - TIME_EPSILON:
            self._emit()
        return self.done

    def _emit(self) -> None:
        if self._current_rgb is None:
            self._current_rgb = self.convert(self._current)
        self.frames.append(self._current_rgb)
