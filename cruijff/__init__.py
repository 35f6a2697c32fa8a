"""cruijff: replicable fine-tuning, prompt-optimization and evaluation experiments."""

__version__ = "0.1.0"
