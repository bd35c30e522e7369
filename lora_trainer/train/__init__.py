"""The training loop, its maths, checkpoints, and the events/commands a UI uses to drive it."""
