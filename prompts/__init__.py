"""Prompt templates (files under prompts/templates/) and their loader."""
