"""Baselines: the editors users would pick instead of UltraEdit, written from their papers
and read against their authors' code, so that they run in this package's harness on the
same model, stream and scores. They are here to be measured beside UltraEdit, not tuned:
LocFT-BF (localised fine-tuning of one MLP down-projection), AlphaEdit (MEMIT-style targets
and multi-layer spread with a null-space projection) and MEMIT. Each implements the
:class:`~ultraedit_fast.editors.protocol.Editor` protocol.
"""

from .alphaedit import AlphaEditConfig, AlphaEditEditor, MEMITConfig, MEMITEditor
from .locft import LocFTConfig, LocFTEditor

__all__ = [
    "AlphaEditConfig",
    "AlphaEditEditor",
    "LocFTConfig",
    "LocFTEditor",
    "MEMITConfig",
    "MEMITEditor",
]
