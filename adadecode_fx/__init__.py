"""adadecode-fx: AdaDecode (early exits + deferred layers + verification) as a torch.fx compiler pass."""
from .config import AdaDecodeConfig
from .errors import AdaDecodeError, HeadsMismatchError, MissingPackageError, UnsupportedModelError
from .heads import ExitHeads, model_fingerprint
from .runtime import AdaDecoder, DecodeProgram, DecodeStats, GenerationResult, SamplingConfig
from .build import build_program  # registers the builder AdaDecoder(model, ...) uses
from .api import decoder_for, generate

__version__ = "0.1.0"
__all__ = ["generate", "decoder_for", "build_program", "AdaDecodeConfig", "AdaDecoder", "DecodeProgram", "ExitHeads", "GenerationResult", "DecodeStats", "SamplingConfig", "AdaDecodeError",
           "HeadsMismatchError", "MissingPackageError", "UnsupportedModelError", "model_fingerprint"]
