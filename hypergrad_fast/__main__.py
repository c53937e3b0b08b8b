"""``python -m hypergrad_fast``: the command line of :mod:`hypergrad_fast.cli`."""

from .cli import main

raise SystemExit(main())
