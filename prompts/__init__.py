"""Prompt templates (files under prompts/templates/) and their loader."""

from mmrag.prompts.loader import TemplateError, load_template, render, template_names

__all__ = ["TemplateError", "load_template", "render", "template_names"]
