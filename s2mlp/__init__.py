"""S²-MLP, S²-MLPv2 and MLP-Mixer in JAX/Flax."""

from s2mlp.models import get_model, model_names
from s2mlp.shift import spatial_shift

__all__ = ["get_model", "model_names", "spatial_shift"]
