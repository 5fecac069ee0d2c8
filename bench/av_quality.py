"""Quality measures for clips of the synthetic dataset (data/synthetic_scene.py): shapes of known
colours moving on a dark background, each bounce/collision/appearance making a sound at that
instant. No learned feature extractor (nothing may be downloaded), so every measure is computed
from the picture and the waveform directly and checked on real clips first (tests/test_av_quality.py):

- `clip_features`: a small hand-made feature vector (colour, coverage, motion, audio loudness,
  onset rate, log-mel band energies); `frechet_distance` between Gaussian fits of two sets of
  them is the "Fréchet-type distance" of the report (an FVD analogue without the I3D network).
- `sound_onsets` and `motion_events`: detected event times; `sync_error` pairs each sound onset
  with the nearest motion event (real clips: 0 ms, by construction of the dataset).
- `dominant_colour` / `motion_axis`: does the clip show what the caption says.

Clips are the pipeline's tensors: video (3, T, H, W) in [-1, 1], audio (C, S) in [-1, 1].
"""

import torch
import torchaudio

from data.synthetic_scene import BACKGROUND, COLOUR_RGB

BG = 2 * BACKGROUND / 255 - 1  # background level in [-1, 1]
FOREGROUND_THRESHOLD = 0.3  # |pixel - background| in [-1, 1] units (about 38 of 255 levels)


def foreground(video: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) -> (T, H, W) bool: pixels clearly different from the background."""
    return (video.float() - BG).abs().amax(0) > FOREGROUND_THRESHOLD


def motion_track(video: torch.Tensor) -> torch.Tensor:
    """(T, 5) per frame: foreground area (fraction), centroid x, y and mean distance to it along x
    and y (pixels). The spread carries the motion of two mirrored shapes ('collide'), whose
    centroid stands still. Frames without foreground repeat the previous values."""
    fg = foreground(video).float()
    T, H, W = fg.shape
    ys = torch.arange(H, dtype=torch.float32)[:, None].expand(H, W)
    xs = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W)
    rows = []
    for t in range(T):
        m = fg[t]
        n = m.sum()
        if n < 1:
            rows.append(rows[-1] if rows else torch.tensor([0.0, W / 2, H / 2, 0.0, 0.0]))
            continue
        cx, cy = (m * xs).sum() / n, (m * ys).sum() / n
        sx, sy = (m * (xs - cx).abs()).sum() / n, (m * (ys - cy).abs()).sum() / n
        rows.append(torch.stack([n / (H * W), cx, cy, sx, sy]))
    return torch.stack(rows)


def motion_events(video: torch.Tensor, fps: float, min_appear: float = 0.1) -> list[float]:
    """Times (s) where the motion reverses or something appears.

    Reversal: of the four position signals (centroid x/y, spread x/y) the one that moves most is
    followed; its velocity per frame interval is signed where faster than max(0.3 px, 20% of its
    top speed) and a sign flip between consecutive signed intervals is a contact, placed midway
    between them (a contact between two frames shows as +v, ~0, -v). Appearance: the foreground
    grows by min_appear of its largest area in one frame; placed at the frame it shows up in."""
    track = motion_track(video)
    times = []
    positions = track[:, 1:]
    moving = int((positions.amax(0) - positions.amin(0)).argmax())
    velocity = positions[1:, moving] - positions[:-1, moving]
    if velocity.numel():
        threshold = max(0.3, 0.2 * float(velocity.abs().max()))
        signed = [(i, 1 if v > 0 else -1) for i, v in enumerate(velocity.tolist()) if abs(v) > threshold]
        times += [((i + 0.5) + (j + 0.5)) / 2 / fps for (i, a), (j, b) in zip(signed[:-1], signed[1:]) if a != b]
    area = track[:, 0]
    if area.max() > 0:
        grows = (area[1:] - area[:-1]) > min_appear * area.max()
        times += [(int(f) + 1) / fps for f in grows.nonzero().flatten()]
    return sorted(times)


def sound_onsets(audio: torch.Tensor, sample_rate: int, hop_s: float = 0.005, floor: float = 0.03, refractory_s: float = 0.1) -> list[float]:
    """Times (s) where the RMS envelope (10 ms windows, 5 ms hop) rises through
    max(floor, 0.3 * its maximum), at most one per refractory_s. The time is the window's start
    minus half a hop, so a sound starting exactly at a sample is found within a hop."""
    mono = audio.float().mean(0)
    hop, win = max(1, round(hop_s * sample_rate)), max(2, round(2 * hop_s * sample_rate))
    if mono.numel() < win:
        return []
    env = mono.unfold(0, win, hop).square().mean(1).sqrt()
    threshold = max(floor, 0.3 * float(env.max()))
    above = env > threshold
    onsets, last = [], -1e9
    for i in (above[1:] & ~above[:-1]).nonzero().flatten().add(1).tolist() + ([0] if bool(above[0]) else []):
        t = i * hop / sample_rate
        if t - last >= refractory_s:
            onsets.append(t)
            last = t
    return sorted(onsets)


def sync_error(onsets: list[float], events: list[float], tolerance: float, max_offset: float = 0.5) -> dict:
    """Sound onsets against motion events. mean_abs_offset_ms: each onset to its nearest event,
    averaged over onsets that have one within max_offset; onsets_matched: fraction of onsets with
    an event within `tolerance` (use one video frame); events_matched: fraction of events with an
    onset within it (a silent bounce, or a video full of spurious motion, lowers this one)."""
    def nearest(x, others):
        return min((abs(x - o) for o in others), default=float("inf"))

    offsets = [nearest(o, events) for o in onsets]
    close = [x for x in offsets if x <= max_offset]
    return {
        "onsets": len(onsets),
        "events": len(events),
        "mean_abs_offset_ms": 1000 * sum(close) / len(close) if close else None,
        "onsets_matched": sum(x <= tolerance for x in offsets) / len(onsets) if onsets else 0.0,
        "events_matched": sum(nearest(e, onsets) <= tolerance for e in events) / len(events) if events else 0.0,
    }


def dominant_colour(video: torch.Tensor) -> str | None:
    """The palette colour (data/synthetic_scene.COLOUR_RGB) most foreground pixels are nearest to."""
    fg = foreground(video)
    if not bool(fg.any()):
        return None
    pixels = (video.float().permute(1, 2, 3, 0)[fg] + 1) * 127.5  # (n, 3) in [0, 255]
    names = list(COLOUR_RGB)
    palette = torch.tensor([COLOUR_RGB[n] for n in names], dtype=torch.float32)
    votes = torch.cdist(pixels, palette).argmin(1).bincount(minlength=len(names))
    return names[int(votes.argmax())]


def motion_axis(video: torch.Tensor) -> str:
    """'horizontal' or 'vertical': the axis along which the centroid moves more."""
    track = motion_track(video)
    return "horizontal" if float(track[:, 1].std()) >= float(track[:, 2].std()) else "vertical"


def clip_features(video: torch.Tensor, audio: torch.Tensor, fps: float, sample_rate: int, n_mels: int = 16) -> torch.Tensor:
    """The feature vector of the Fréchet-type distance (see the module docstring)."""
    fg = foreground(video)
    track = motion_track(video)
    colour = (video.float().permute(1, 2, 3, 0)[fg].mean(0) if bool(fg.any()) else torch.full((3,), BG))
    frame_diff = (video[:, 1:].float() - video[:, :-1].float()).abs().mean()
    seconds = video.shape[1] / fps
    mono = audio.float().mean(0)
    mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=256, hop_length=64, n_mels=n_mels)(mono)
    return torch.cat([
        colour,
        torch.stack([
            fg.float().mean(), frame_diff, track[:, 1].std(), track[:, 2].std(), track[:, 3].mean(), track[:, 4].mean(),
            torch.tensor(len(motion_events(video, fps)) / seconds),
            mono.square().mean().sqrt(),
            torch.tensor(len(sound_onsets(audio, sample_rate)) / seconds),
        ]),
        (mel.mean(1) + 1e-6).log(),
    ])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of rows of a
    and b (n, d), in float64. tr((S_a S_b)^(1/2)) is the sum of the square roots of the
    eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric, so eigh is exact and stable)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross)
