"""``python -m ultraedit_fast``: the ``ultraedit-fast`` command."""
import sys

from .cli.main import main

sys.exit(main())
