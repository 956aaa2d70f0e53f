"""`python -m lowrank_rlhf.bench`: the same as `lowrank-rlhf bench`."""

import sys

from .command import main

sys.exit(main())
