"""``python -m lowbit.cli ...`` = ``lowbit ...``."""
import sys

from lowbit.cli import main

sys.exit(main())
