"""``python -m attncc``: the ``attncc`` command line (see :mod:`attncc.cli`)."""

import sys

from .cli import main

sys.exit(main())
