"""`python -m cruijff`: the CLI under this interpreter (what generated scripts call)."""

from cruijff.cli import main

main()
