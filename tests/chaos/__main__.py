"""`python -m tests.chaos`: the chaos campaign (see tests/chaos/campaign.py)."""

import sys

from tests.chaos.campaign import main

sys.exit(main())
