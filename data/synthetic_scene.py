"""One synthetic clip: shapes moving on a dark background whose motion events (wall bounces,
collisions, appearances) happen exactly on video frames and emit a short sound starting at
exactly that instant, so audio-video sync can be measured against known times.

Motion is a triangle wave between two contact positions: contacts happen every `period` frames,
at frames phase, phase + period, ... (never frame 0, so every contact is an event)."""

from dataclasses import dataclass, field

import numpy as np

from data.synthetic_captions import COLOURS, SHAPES, SOUNDS

MOTIONS = ("horizontal", "vertical", "collide", "appear")
COLOUR_RGB = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (50, 90, 230), "yellow": (240, 210, 40),
              "white": (235, 235, 235)}
BACKGROUND = 24
SOUND_AMPLITUDE = 0.5


@dataclass
class Scene:
    width: int
    height: int
    fps: int
    num_frames: int
    motion: str
    shapes: list[tuple[str, str]]  # (shape, colour); two for 'collide'
    sound: str
    size: int  # shape side / diameter, pixels
    period: int  # frames between contacts
    phase: int  # first contact frame, in [1, period)
    across: int  # fixed coordinate on the axis the shape does not move along
    spots: list[tuple[int, int]] = field(default_factory=list)  # 'appear': top-left of each appearance
    events: list[dict] = field(default_factory=list)  # {'frame', 'time', 'type'}


def make_scene(width: int, height: int, fps: int, seconds: float, rng: np.random.Generator) -> Scene:
    num_frames = round(seconds * fps)
    motion = str(rng.choice(MOTIONS))
    colours = rng.choice(COLOURS, size=2, replace=False)
    shapes = [(str(rng.choice(SHAPES)), str(colours[0]))]
    if motion == "collide":
        shapes.append((str(rng.choice(SHAPES)), str(colours[1])))
    size = max(8, 2 * round(min(width, height) * 0.11))
    # A contact every third to two thirds of a second.
    period = int(rng.integers(max(4, round(fps / 3)), max(5, round(2 * fps / 3)) + 1))
    phase = int(rng.integers(1, period))
    limit = (width if motion == "vertical" else height) - size
    scene = Scene(width, height, fps, num_frames, motion, shapes, str(rng.choice(SOUNDS)), size, period, phase,
                  across=int(rng.integers(0, limit + 1)))
    for n, frame in enumerate(range(phase, num_frames, period)):
        if motion == "appear":
            kind = "appear"
            scene.spots.append((int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))))
        elif motion == "collide":
            kind = "collision" if n % 2 else "bounce"  # odd contacts are in the middle
        else:
            kind = "bounce"
        scene.events.append({"frame": frame, "time": frame / fps, "type": kind})
    return scene


def _triangle(frame: int, scene: Scene) -> float:
    """0 at even contacts, 1 at odd contacts, linear in between."""
    s = ((frame - scene.phase) / scene.period) % 2.0
    return s if s <= 1.0 else 2.0 - s


def _draw(canvas: np.ndarray, shape: str, colour: str, left: int, top: int, size: int) -> None:
    patch = canvas[top : top + size, left : left + size]
    rows, cols = np.mgrid[0:size, 0:size]
    if shape == "circle":
        radius = size / 2
        inside = (rows + 0.5 - radius) ** 2 + (cols + 0.5 - radius) ** 2 <= radius**2
    elif shape == "triangle":  # apex up
        inside = np.abs(cols + 0.5 - size / 2) <= (rows + 1) / 2
    else:
        inside = np.ones((size, size), bool)
    patch[inside] = COLOUR_RGB[colour]


def render_frame(scene: Scene, frame: int) -> np.ndarray:
    """uint8 (height, width, 3) RGB of frame `frame`."""
    canvas = np.full((scene.height, scene.width, 3), BACKGROUND, np.uint8)
    size, u = scene.size, _triangle(frame, scene)
    if scene.motion == "horizontal":
        _draw(canvas, *scene.shapes[0], round(u * (scene.width - size)), scene.across, size)
    elif scene.motion == "vertical":
        _draw(canvas, *scene.shapes[0], scene.across, round(u * (scene.height - size)), size)
    elif scene.motion == "collide":
        # Left shape between the left wall and the middle, the right one mirrored: they touch
        # in the middle at odd contacts and touch the walls at even ones.
        left = round(u * (scene.width / 2 - size))
        _draw(canvas, *scene.shapes[0], left, scene.across, size)
        _draw(canvas, *scene.shapes[1], scene.width - size - left, scene.across, size)
    else:
        for event, (left, top) in zip(scene.events, scene.spots):
            if frame >= event["frame"]:
                _draw(canvas, *scene.shapes[0], left, top, size)
    return canvas


def _sound(kind: str, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A short sound with its onset (full attack) at sample 0."""
    t = np.arange(round(0.15 * sample_rate)) / sample_rate
    if kind == "high_beep":
        wave = np.sin(2 * np.pi * 1320 * t) * np.exp(-t / 0.03)
    elif kind == "low_beep":
        wave = np.sin(2 * np.pi * 440 * t) * np.exp(-t / 0.04)
    elif kind == "click":
        wave = rng.uniform(-1, 1, t.size) * np.exp(-t / 0.004)
    else:  # drum: pitch falling from 120 to 50 Hz
        phase = 2 * np.pi * (50 * t + 70 * 0.03 * (1 - np.exp(-t / 0.03)))
        wave = np.sin(phase) * np.exp(-t / 0.06)
    return (SOUND_AMPLITUDE * wave).astype(np.float32)


def render_audio(scene: Scene, seconds: float, sample_rate: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (channels, round(seconds * sample_rate)): silence plus one sound per event,
    starting at sample round(event time * sample_rate)."""
    audio = np.zeros(round(seconds * sample_rate), np.float32)
    sound = _sound(scene.sound, sample_rate, rng)
    for event in scene.events:
        onset = round(event["frame"] * sample_rate / scene.fps)
        end = min(audio.size, onset + sound.size)
        audio[onset:end] += sound[: end - onset]
    np.clip(audio, -1, 1, out=audio)
    return np.repeat(audio[None], channels, axis=0)

