"""The package's one logger, ``logging.getLogger("ultraedit_fast")``: which backend was
chosen, which preset and regime a turn took, a compile or a fallback. Every module logs
through :data:`log`; the package never configures handlers (that is the application's)."""

import logging

log = logging.getLogger("ultraedit_fast")
