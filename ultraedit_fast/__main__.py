"""``python -m ultraedit_fast``: the ``ultraedit-fast`` command."""

import sys

from .cli import main

sys.exit(main())
