"""`./dev.sh demo`: the main job on the embedded default (see perfusion/world/w2/demo.py)."""

import sys

from .world.w2.demo import main

if __name__ == "__main__":
    sys.exit(main())
