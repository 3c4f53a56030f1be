"""`python -m cli` is the `apiary` command."""

import sys

from cli.main import main

sys.exit(main())
