"""``python -m xenpv`` is the ``xenpv`` command."""

import sys

from xenpv.cli import main

sys.exit(main())
