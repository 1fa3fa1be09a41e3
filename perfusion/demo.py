"""The main job (`./dev.sh demo`): train a concept in the miniature world and render a contact sheet.

The miniature world (scenes, mini model, adapter) is not built yet; until it lands this command
says what it will do and exits without pretending to have done it.
"""
import sys

PLAN = """sd-webui-perfusion demo: not available yet.

When the miniature text-to-image world lands, this command will:
  1. load the embedded mini model (ldm UNetModel + small CLIP text encoder, pixel space),
  2. train a concept from the bundled images of a checkered ball (a pattern the model never saw),
  3. render a labelled contact sheet: recontextualising prompts, a beta sweep, local vs global
     key-locking, the concept combined with a second concept, and the base model,
  4. print where the PNG is.

What works today: the engine (concept files, the gated rank-1 edit, hooks, covariance);
run `./dev.sh test` to check it."""


def main() -> int:
    print(PLAN)
    return 3


if __name__ == "__main__":
    sys.exit(main())
