"""Preset configs (``default``, ``tiny``), shipped as package data of ``mmrag.configs``.

``mmrag.pipelines.config.load_config("tiny")`` finds them through :mod:`importlib.resources`.
"""
