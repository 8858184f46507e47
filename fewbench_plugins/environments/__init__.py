"""Built-in environment plugins: distributions of reinforcement-learning tasks."""
