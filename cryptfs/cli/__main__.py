"""``python -m cryptfs.cli``: the same as the ``cryptfs`` command."""

import sys

from cryptfs.cli.main import main

sys.exit(main())
