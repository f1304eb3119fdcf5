"""``python -m sovpack``."""

from sovpack.cli import main

main()
