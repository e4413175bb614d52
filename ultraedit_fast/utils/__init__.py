"""Helpers that know nothing of models or editing: atomic file writes and path checks
(:mod:`.files`), argument checks shared by the public entry points (:mod:`.checks`), number
formats, progress bars and plotting set-up (:mod:`.display`), and the facts about the
machine a result was measured on (:mod:`.environment`)."""
