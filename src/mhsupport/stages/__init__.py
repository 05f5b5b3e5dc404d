"""Pipeline stages: each declares `requires(cfg)` and `build(cfg, run, inputs)`; `pipeline.py` plans
and runs them."""
