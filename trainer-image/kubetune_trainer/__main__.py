"""``python -m kubetune_trainer`` (what torchrun starts in every pod)."""

import sys

from .main import main

sys.exit(main())
