"""python -m multiqueue.cli: the mq command."""

import sys

from . import main

sys.exit(main())
