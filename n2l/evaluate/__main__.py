"""``python -m n2l.evaluate``: the same as ``n2l eval``."""

import sys

from . import main

sys.exit(main())
