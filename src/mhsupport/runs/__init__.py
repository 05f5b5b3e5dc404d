"""Runs: content-addressed run folders with their manifests and locks, the cleaning of what killed
processes leave, and the Hugging Face cards that describe a run's data and models."""
