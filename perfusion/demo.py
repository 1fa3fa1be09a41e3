"""`./dev.sh demo`: the main job on the embedded default (see perfusion/world/demo.py)."""

import sys

from .world.demo import main

if __name__ == "__main__":
    sys.exit(main())
