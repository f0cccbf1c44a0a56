"""A module that fails while being imported (for tests/test_cli.py: a model spec naming it is a usage error)."""

raise RuntimeError("boom at import")
