"""PSFL (main system): personal mentors distilled into a shared student (PLD), SNR-adaptive global pruning (AGP), privacy."""
