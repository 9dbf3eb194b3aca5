"""``python -m lorarar``: the same command line as the ``lorarar`` script."""

import sys

from .cli import main

sys.exit(main())
