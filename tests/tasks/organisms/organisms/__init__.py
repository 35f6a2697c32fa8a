"""A data generator package, as a task written elsewhere ships one beside its eval.py."""

from organisms.generate import records

__all__ = ["records"]
