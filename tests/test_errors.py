"""One error hierarchy: every error a user can cause derives from mmrag.MMRAGError, and the CLI
prints exactly those as one line with exit 2 (anything else is a bug and says so, exit 1)."""

from __future__ import annotations

import inspect

import pytest

import mmrag
from mmrag.errors import MMRAGError
from mmrag.generators import errors as generator_errors
from mmrag.pipelines import cli
from mmrag.prompts import TemplateError
from mmrag.retrievers import errors as retriever_errors


@pytest.mark.parametrize("module", [retriever_errors, generator_errors])
def test_every_typed_error_derives_from_the_one_root(module):
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if issubclass(c, Exception)]
    assert classes
    assert all(issubclass(c, MMRAGError) for c in classes), [c for c in classes if not issubclass(c, MMRAGError)]
    assert issubclass(TemplateError, MMRAGError) and mmrag.MMRAGError is MMRAGError


@pytest.mark.parametrize("error, code", [
    (generator_errors.GuidanceError("`eta` must be in [0, 1], got 2."), 2),
    (TemplateError("No prompt template 'x'."), 2),
    (retriever_errors.ConfigError("`k` must be a positive integer, got 0."), 2),
    (RuntimeError("boom"), 1),
])
def test_cli_maps_the_hierarchy_to_exit_codes(monkeypatch, capsys, error, code):
    def raise_it(args):
        raise error

    monkeypatch.setitem(cli._COMMANDS, "env", raise_it)
    monkeypatch.delenv("MMRAG_DEBUG", raising=False)
    assert cli.main(["env"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(error) in err[0]
    assert ("unexpected RuntimeError" in err[0]) == (code == 1)
