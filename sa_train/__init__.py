"""sa_train: train small Shared-Attention-native LLMs from scratch.

The public API is the model, its config, and the model with its tokenizer for text in and out; training,
data and tools live in submodules.
"""

from sa_train.config import SAConfig
from sa_train.model import SAModel
from sa_train.text import TextModel

__all__ = ["SAConfig", "SAModel", "TextModel"]
__version__ = "0.1.0"
