"""Train stage, inside Ray Train workers: the seeded batch stream, the training loop, stacks of seeds."""
