"""``python -m hrsa``: the same command as ``hrsa``."""

from hrsa.cli import main

main()
