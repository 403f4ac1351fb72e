"""Training helpers beyond :mod:`kissray.train`: learning from stored embeddings."""
