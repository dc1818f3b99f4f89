"""Makes `tests` a package so helpers import as `tests.checkpoints` from any test module."""
