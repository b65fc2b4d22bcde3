"""``python -m trio_blobs``: the ``trio-blobs`` command line."""

import sys

from ._cli import main

sys.exit(main())
