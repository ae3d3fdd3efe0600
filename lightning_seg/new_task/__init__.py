"""`lightning-seg-new-task`: plan a labelled folder's task config (above the core; uses study/memory)."""
