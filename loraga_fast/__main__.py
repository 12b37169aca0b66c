"""``python -m loraga_fast`` = the ``loraga-fast`` command."""

import sys

from .cli import main

sys.exit(main())
