"""Plan a task config for a user's own labelled folder (`lightning-seg-new-task`): fingerprint, plan, write.

A floor of its own above the core: it sizes patches with the study's memory planner."""
