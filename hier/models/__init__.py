"""The network: trunk -> normalised embedding -> cosine heads (``hiernet``), and its training step."""
from hier.models.hiernet import (
                                 CosineHead,
                                 HierNet,
                                 HierTask,
                                 ModelConfig,
                                 create_trunk,
                                 load_offline_weights,
                                 load_weights_file,
                                 trunk_parts,
)

__all__ = [
    "CosineHead", "HierNet", "HierTask", "ModelConfig", "create_trunk", "load_offline_weights",
    "load_weights_file", "trunk_parts"]
