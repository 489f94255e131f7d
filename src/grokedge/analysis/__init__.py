"""The machinery that runs analyses during training, Lightning-free: their schedule, the fixed
evaluation subsets and probe targets, the background worker and its queue of jobs, and the
preserved random state."""
