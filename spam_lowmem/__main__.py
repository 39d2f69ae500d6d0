"""``python -m spam_lowmem``: the ``spam-lowmem`` command line (see :mod:`spam_lowmem.cli`)."""

import sys

from .cli import main

sys.exit(main())
