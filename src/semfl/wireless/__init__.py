"""The wireless floor: the physical channel inside semantic models, the FL link (bits -> delay, energy), payload codecs and compression primitives."""
