"""tokenmill's own decoder forward (`--model-impl native`) and the loaders that feed it."""

from services.worker.engine.models.decoder import DecoderModel
from services.worker.engine.models.spec import ARCHITECTURES, DecoderSpec, Unsupported

__all__ = ["ARCHITECTURES", "DecoderModel", "DecoderSpec", "Unsupported"]
