"""Lifelong runs: ``T`` turns of ``M`` edits through any :class:`~ultraedit_fast.editors.Editor`,
scored before, along and after the stream, with timings, peak memory, exports and a
resumable record written as one JSON file (:mod:`.runner`) and one PNG plot
(:mod:`.plot`)."""

from .runner import run_lifelong, score

__all__ = ["run_lifelong", "score"]
