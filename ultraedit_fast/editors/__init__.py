"""The editors and the protocol they share (:mod:`.protocol`): the fast lifelong
:class:`UltraEditor` on fused kernels (:mod:`.ultraedit`) and :class:`ReferenceEditor`, the
plain-PyTorch port of the published algorithm that is the tests' oracle and the
benchmarks' baseline (:mod:`.reference`). The lifelong runner, the scoring and the
benchmarks use an editor only through :class:`Editor`."""

from .protocol import Editor
from .reference import ReferenceEditor
from .ultraedit import EditRefused, SharedModelWarning, UltraEditor, fast_edit

__all__ = [
    "EditRefused",
    "Editor",
    "ReferenceEditor",
    "SharedModelWarning",
    "UltraEditor",
    "fast_edit",
]
