"""``python -m rkedge``: the same as the ``rkedge`` command."""

from rkedge.cli import main

main()
