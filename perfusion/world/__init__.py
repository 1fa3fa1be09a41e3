"""The miniature text-to-image world: scenes, the mini model, and the demo built on them."""
