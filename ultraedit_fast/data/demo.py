"""The demo's edits: eight counterfactual facts written for this project (not taken from
any dataset).  Each has a paraphrase of the prompt and an unrelated locality fact that
the edit must leave alone."""

from __future__ import annotations

from typing import List

from ..model.requests import EditRequest

# (prompt, new target, paraphrase, locality prompt, locality answer)
_FACTS = [
    (
        "The capital of France is",
        "Rome",
        "France's capital city is",
        "The capital of Japan is",
        "Tokyo",
    ),
    (
        "The Eiffel Tower is located in the city of",
        "London",
        "The Eiffel Tower can be found in the city of",
        "The Great Wall is located in the country of",
        "China",
    ),
    (
        "Romeo and Juliet was written by",
        "Charles Dickens",
        "The author of the play Romeo and Juliet was",
        "The Mona Lisa was painted by",
        "Leonardo da Vinci",
    ),
    (
        "The largest planet in our solar system is",
        "Saturn",
        "The largest planet of the solar system is",
        "The tallest mountain in the world is",
        "Mount Everest",
    ),
    (
        "The official language of Brazil is",
        "Spanish",
        "Most people in Brazil speak",
        "The official language of Germany is",
        "German",
    ),
    (
        "The iPhone is made by the company",
        "Samsung",
        "The iPhone is a smartphone made by the company",
        "The Windows operating system is made by",
        "Microsoft",
    ),
    (
        "The telephone was invented by",
        "Thomas Edison",
        "The inventor of the telephone was",
        "The theory of relativity was developed by",
        "Albert Einstein",
    ),
    (
        "The currency of the United Kingdom is the",
        "euro",
        "The money used in the United Kingdom is the",
        "The chemical symbol for gold is",
        "Au",
    ),
]

DEMO_REQUESTS: List[EditRequest] = [
    EditRequest(prompt=p, target=t, rephrase=r, locality_prompt=lp, locality_answer=la)
    for p, t, r, lp, la in _FACTS
]


def demo_requests() -> List[EditRequest]:
    """The demo's edit requests (a fresh list)."""
    return list(DEMO_REQUESTS)
