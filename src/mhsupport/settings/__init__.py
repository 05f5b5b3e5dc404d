"""Settings: composing a stage's config with Hydra (and the upstream configs it implies), the
allowed values and the one check of a config, and the CLI flags that set config keys."""
