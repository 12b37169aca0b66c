"""``python -m loraga_fast`` = the ``loraga-fast`` command."""

import sys

from .command.main import main

sys.exit(main())
