"""mhsupport: strategy-aware supporter models for mental-health conversations."""

__version__ = "0.1.0"
