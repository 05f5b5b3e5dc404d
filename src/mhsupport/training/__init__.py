"""Training with the Hugging Face Trainer: the one resumable sequence both training stages run, its
process roles under torchrun, epoch-end validation, the generator's custom Trainers, and curves."""
