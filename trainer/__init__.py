"""Cross-Modal CutMix, the model, the objectives and the training loop."""
