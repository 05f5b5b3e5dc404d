"""Pipeline stages: each is a plain `run(cfg) -> result` that the CLI and the tests call."""
