"""torchtune recipes that cruijff runs in place of torchtune's own, where the stock one has a bug.

Each module is a thin subclass of the torchtune recipe of the same name, runnable as
``python -m cruijff.recipes.<name> --config <file> [key=value ...]``, the same command line
as ``tune run <name>``.
"""
