"""``python -m gna_flex.sim``: the same as the ``gna-sim`` command."""

import sys

from .cli import main

sys.exit(main())
