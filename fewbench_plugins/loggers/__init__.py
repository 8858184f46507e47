"""Built-in logger plugins: experiment trackers (TensorBoard, Weights & Biases, MLflow)."""
