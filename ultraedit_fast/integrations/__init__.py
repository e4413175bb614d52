"""Other tools' ways in: an EasyEdit-compatible ``apply_algo`` entry point and runner
(:mod:`.easyedit`), so a study written for EasyEdit's UltraEdit can run this package's
editor unchanged."""
