"""From TOML text to a checked ``Experiment``: loading and ``extends``, the core sections, factory schemas."""
