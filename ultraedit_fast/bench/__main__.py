"""``python -m ultraedit_fast.bench``: the benchmarks' command line."""

import sys

from .cli import main

sys.exit(main())
