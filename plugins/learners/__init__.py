"""Built-in learners plugins."""
