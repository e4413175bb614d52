"""What an editor writes to disk and reads back: the lifelong state as an atomic,
hash-checked checkpoint (:mod:`.checkpoint`; its manifest in :mod:`.manifest`, the model
fingerprint it checks in :mod:`.fingerprint`, its directory lock in :mod:`.directory`),
and the edits themselves as a weight patch for a fresh copy of the base model or as a PEFT
LoRA adapter (:mod:`.export`). Loading never runs code: JSON and safetensors only, read from
regular files only, every manifest checked against its schema and every tensor against its
recorded sha256 before anything is built or written (:mod:`.validation`)."""

from .checkpoint import CheckpointWeightsWarning
from .export import apply_patch, load_lora

__all__ = ["CheckpointWeightsWarning", "apply_patch", "load_lora"]
