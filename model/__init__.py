"""The joint audio-video transformer. Pure torch + einops: no Lightning, no I/O, no parallelism."""

from model.args import MODALITIES, ROLES, ModelArgs
from model.block import ModalityBlock, SharedBlock, TransformerBlock
from model.layout import Segment, SequenceLayout
from model.text import encode_bytes
from model.transformer import AVTransformer, count_parameters
from model.window import VideoWindow


def build_model(**kwargs) -> AVTransformer:
    """Hydra target: `_target_: model.build_model` plus ModelArgs fields."""
    return AVTransformer(ModelArgs(**kwargs))


__all__ = [
    "MODALITIES",
    "ROLES",
    "AVTransformer",
    "ModalityBlock",
    "ModelArgs",
    "Segment",
    "SequenceLayout",
    "SharedBlock",
    "TransformerBlock",
    "VideoWindow",
    "build_model",
    "count_parameters",
    "encode_bytes",
]
