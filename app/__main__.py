"""``python -m app`` is ``ntk-unlearn``."""

from .cli import main

main()
