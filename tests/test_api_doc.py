"""docs/api.md is generated from the docstrings, lists every public name, and is current."""
from __future__ import annotations

from pathlib import Path

import pytest

import cora_fx
from cora_fx.tools import api_doc

pytestmark = pytest.mark.unit
API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_every_public_name_is_in_exactly_one_section():
    listed = [name for names in api_doc.SECTIONS.values() for name in names]
    assert sorted(listed) == sorted(cora_fx.__all__)
    assert len(listed) == len(set(listed))


def test_docs_api_md_is_what_the_docstrings_generate():
    assert API.read_text() == api_doc.render(), "regenerate: python -m cora_fx.tools.api_doc docs/api.md"


def test_every_public_name_has_a_docstring_and_a_heading():
    text = api_doc.render()
    for name in cora_fx.__all__:
        obj = getattr(cora_fx, name)
        assert f"### `{name}`" in text
        if callable(obj) or hasattr(obj, "__file__"):
            assert (obj.__doc__ or "").strip(), f"cora_fx.{name} has no docstring"


def test_config_tables_list_every_field_with_its_meaning():
    import dataclasses
    for cls in (cora_fx.QuantConfig, cora_fx.AdapterConfig, cora_fx.RoundingConfig, cora_fx.SearchConfig,
                cora_fx.RefineConfig, cora_fx.ActivationConfig):
        table = api_doc.config_group(cls)
        for field in dataclasses.fields(cls):
            row = next(line for line in table.splitlines() if line.startswith(f"| `{field.name}` |"))
            assert row.rstrip(" |").split("|")[-1].strip(), f"{cls.__name__}.{field.name} has no meaning"
