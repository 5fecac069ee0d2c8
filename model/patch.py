"""Latents <-> token rows. Patches are flattened channel-last so a token row is (c, pt, ph, pw)."""

import torch
from einops import rearrange


def patchify_video(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T/pt * H/ph * W/pw, C*pt*ph*pw), tokens in (t, h, w) raster order."""
    pt, ph, pw = patch
    return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)


def unpatchify_video(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    pt, ph, pw = patch
    t, h, w = grid
    return rearrange(tokens, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)


def patchify_image(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/ph * W/pw, C*ph*pw): an image is a one-frame video with no temporal patch."""
    return patchify_video(x.unsqueeze(2), (1, patch[1], patch[2]))


def unpatchify_image(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    return unpatchify_video(tokens, grid, (1, patch[1], patch[2])).squeeze(2)


def patchify_audio(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, T) -> (B, T/p, C*p)."""
    return rearrange(x, "b c (t p) -> b t (c p)", p=patch)


def unpatchify_audio(tokens: torch.Tensor, patch: int) -> torch.Tensor:
    return rearrange(tokens, "b t (c p) -> b c (t p)", p=patch)
