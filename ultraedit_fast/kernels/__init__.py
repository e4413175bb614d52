"""The ground floor: the arithmetic of a turn and the kernels that run it.

Nothing here imports anything else of the package.

- :mod:`.formulas`: ``EPS`` and the normaliser-merge and shift-value formulas, shared by the
  default kernels and the reference editor.
- :mod:`.ops`: the ``torch.library`` schemas of the ``ultraedit_fast`` ops, their pure-PyTorch
  default kernels, and the loading of the compiled extension (``_C``: C++ CPU and CUDA kernels
  registered with ``TORCH_LIBRARY_IMPL``).
- :mod:`.triton_kernels`: the Triton kernels (imported only when the ``triton`` backend runs).
- :mod:`.backends`: the one place that chooses which kernels a turn runs.
"""
from .backends import (BACKENDS, Backend, available_backends, requested_backend,  # noqa: F401
                       resolve_backend)
from .formulas import EPS  # noqa: F401
from .ops import EXTENSION_ERROR  # noqa: F401
