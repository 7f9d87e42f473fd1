"""``python -m rollout serve ...``: the same as the ``rollout`` console script."""

import sys

from rollout.cli import main

if __name__ == "__main__":
    sys.exit(main())
