"""Trained models outside their run: reading a model file (:mod:`.loading`) and using the
model it holds (:mod:`.trained`: predict, preprocess, evaluate). ``fewbench.api`` re-exports
what users call."""
