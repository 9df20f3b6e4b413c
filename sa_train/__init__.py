"""sa_train: train small Shared-Attention-native LLMs from scratch.

The public API is the model and its config; training, data and tools live in submodules.
"""

from sa_train.config import SAConfig
from sa_train.model import SAModel

__all__ = ["SAConfig", "SAModel"]
__version__ = "0.1.0"
