"""``python -m mfcon.cli ...``: the same as the ``mfcon`` script."""

import sys

from mfcon.cli import main

sys.exit(main())
