"""``python -m crossguard``: the ``crossguard`` command."""

import sys

from integrations.cli import main

sys.exit(main())
