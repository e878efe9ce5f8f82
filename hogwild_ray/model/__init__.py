"""Model loading and the decoder forward pass."""

from .decoder import Decoder, ForwardBatch
from .loader import Checkpoint, locate
from .spec import ModelSpec, spec_from_config

__all__ = ["Checkpoint", "Decoder", "ForwardBatch", "ModelSpec", "locate", "spec_from_config"]
