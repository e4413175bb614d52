"""The field's datasets as edit requests: zsRE, CounterFact, FEVER, WikiBigEdit and
UltraEditBench records read as a stream, their format detected, malformed records skipped
and counted (:mod:`.datasets`, over the streaming JSON reader of :mod:`.jsonstream` and
the per-format record converters of :mod:`.formats`), and the demo's eight counterfactual
facts (:mod:`.demo`)."""

from .datasets import Example, iter_examples, load_requests
from .demo import demo_requests

__all__ = ["Example", "demo_requests", "iter_examples", "load_requests"]
