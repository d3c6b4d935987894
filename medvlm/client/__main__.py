"""`python -m medvlm.client`: the medvlm command line."""

import sys

from medvlm.client.cli import main

sys.exit(main())
