"""Text as UTF-8 bytes: the model's byte vocabulary and the caption -> ids step."""

import torch

from model.args import TEXT_PADDINGS

BYTE_PAD = 256
BYTE_BOS = 257
BYTE_EOS = 258
BYTE_VOCAB = 259


def encode_bytes(captions: list[str], length: int, padding: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (ids (B, length) long, mask (B, length) bool, True on real tokens).

    BOS + UTF-8 bytes + EOS, cut to `length` and padded with BYTE_PAD before BOS (padding="left")
    or after EOS ("right"; ModelArgs.text_padding). An empty caption (dropped for classifier-free
    guidance) is BOS + EOS, so the unconditional input is a learned pair of tokens rather than
    nothing."""
    if length < 2:
        raise ValueError(f"text length={length}: must be >= 2 (BOS and EOS)")
    if padding not in TEXT_PADDINGS:
        raise ValueError(f"padding={padding!r}: choose one of {', '.join(TEXT_PADDINGS)}")
    ids = torch.full((len(captions), length), BYTE_PAD, dtype=torch.long)
    for row, caption in enumerate(captions):
        body = list(caption.encode("utf-8"))[: length - 2]
        tokens = torch.tensor([BYTE_BOS, *body, BYTE_EOS])
        if padding == "left":
            ids[row, length - len(tokens) :] = tokens
        else:
            ids[row, : len(tokens)] = tokens
    return ids, ids != BYTE_PAD
