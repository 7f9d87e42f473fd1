"""Engine side of weight updates: checking an update against the model, reading its bytes, applying it."""
