"""End-to-end pipelines, config loading, CLI and evaluation."""
