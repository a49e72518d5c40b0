"""Generators: the VLM answerer and the reference-grounded diffusion generator (see ARCHITECTURE.md)."""
