"""``python -m refit.cli``."""

from refit.cli import main

main()
