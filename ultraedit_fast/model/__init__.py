"""What the package knows about a Hugging Face causal language model and its inputs:
edit requests and their tokenisation into mini-batches and packed passes
(:mod:`.requests`), the modules an editor may write (:mod:`.targets`), the forward-pass
helpers that run the top of the network on answer rows only (:mod:`.forward`), and loading
a model, the embedded SmolLM2 by default (:mod:`.loading`)."""

from .loading import load_model
from .requests import EditRequest

__all__ = ["EditRequest", "load_model"]
