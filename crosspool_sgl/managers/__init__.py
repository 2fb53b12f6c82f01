"""Request lifecycle: requests, the scheduling policy, the model runner and the scheduler loop."""
