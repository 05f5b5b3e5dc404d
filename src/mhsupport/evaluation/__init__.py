"""Scoring what the models do: the statistics every comparison uses, classification and generation
metrics (two metric protocols), tag use by likelihood, the tag samplers, the responders an eval
scores (fine-tuned, base or a prompted chat model), stored generations, and human evaluation."""
