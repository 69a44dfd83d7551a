"""Runnable recipes behind the ``wmss`` command, one module per command, readable top to bottom."""
