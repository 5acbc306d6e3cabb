"""phi3v: fast native PyTorch inference for Phi-3-Vision and Phi-3.5-Vision."""

from .errors import (
    CheckpointError,
    DeviceError,
    ImageError,
    ModelNotFoundError,
    Phi3VError,
    PromptError,
    PromptTooLongError,
    TooManyImagesError,
    VideoError,
)
from .options import GenerationOptions
from .results import Completion, Timings, Usage

DEFAULT_MODEL = "microsoft/Phi-3-vision-128k-instruct"
SUPPORTED_MODELS = ("microsoft/Phi-3-vision-128k-instruct", "microsoft/Phi-3.5-vision-instruct")

__version__ = "0.1.0"


def load(model: str = DEFAULT_MODEL, **kwargs):
    """Load a model folder or hub id; see phi3v.api.Phi3V.load for the arguments."""
    from .api import Phi3V

    return Phi3V.load(model, **kwargs)


def __getattr__(name):  # lazy: keep `import phi3v` light for the CLI's --help
    if name == "Phi3V":
        from .api import Phi3V

        return Phi3V
    raise AttributeError(name)
