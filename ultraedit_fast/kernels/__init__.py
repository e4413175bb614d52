"""The ground floor: the arithmetic of a turn and the kernels that run it.

Nothing here imports anything else of the package but its logger (``_log``).

- :mod:`.formulas`: ``EPS`` and the normaliser-merge and shift-value formulas, shared by the
  default kernels and the reference editor.
- :mod:`.ops`: the ``torch.library`` schemas of the ``ultraedit_fast`` ops and their
  pure-PyTorch default kernels.
- :mod:`.extension`: the compiled kernels (C++ CPU and CUDA, registered with
  ``TORCH_LIBRARY_IMPL``), built at install or for the torch at hand on first use.
- :mod:`.triton_kernels`: the Triton kernels (imported only when the ``triton`` backend runs),
  and :mod:`.triton_host`, their launchers' plain-PyTorch checks and helpers.
- :mod:`.backends`: the one place that chooses which kernels a turn runs.
"""

from .backends import (
    BACKENDS,
    Backend,
    available_backends,
    requested_backend,  # noqa: F401
    resolve_backend,
)
from .formulas import EPS  # noqa: F401
from .ops import extension_error  # noqa: F401
