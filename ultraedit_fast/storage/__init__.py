"""What an editor writes to disk and reads back: the lifelong state as an atomic,
hash-checked checkpoint (:mod:`.checkpoint`), and the edits themselves as a weight patch
for a fresh copy of the base model or as a PEFT LoRA adapter (:mod:`.export`). Loading
never runs code: JSON and safetensors only."""
from .checkpoint import CheckpointWeightsWarning
from .export import apply_patch, load_lora

__all__ = ["CheckpointWeightsWarning", "apply_patch", "load_lora"]
