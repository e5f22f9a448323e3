"""``python -m jaxckpt``: the ``jaxckpt`` command line (see :mod:`jaxckpt.cli`)."""

import sys

from jaxckpt.cli import main

sys.exit(main())
