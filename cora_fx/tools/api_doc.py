"""docs/api.md, generated from the public names' docstrings: ``python -m cora_fx.tools.api_doc docs/api.md``.

Every name in ``cora_fx.__all__`` belongs to one section of `SECTIONS`; tests/test_api_doc.py checks that and that
the file is what this writes. Config groups get a field table (type, default, meaning from the ``Attributes:``
block of the group's docstring); functions their signature and docstring.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

#: Sections of the reference, in order: title -> public names.
SECTIONS: dict[str, tuple[str, ...]] = {
    "Configuration": ("CoRaConfig", "QuantConfig", "AdapterConfig", "RoundingConfig", "SearchConfig",
                      "RefineConfig", "ReconstructConfig", "ActivationConfig", "NormalObserver"),
    "Workflow": ("prepare_cora", "calibrate_activations", "calibrate_rounding", "search_ranks", "set_ranks",
                 "reconstruct", "correct_batchnorm", "finetune", "convert_cora", "run_pipeline", "quantize_cora",
                 "plan_target", "STEPS"),
    "Results and reports": ("PipelineResult", "RankSearchResult", "SearchHistory", "FinetuneResult",
                            "ReconstructResult", "summary",
                            "CoRaSummary", "LayerInfo", "plot_ranks", "plot_search"),
    "Artifacts": ("save", "load", "read_summary", "export_onnx"),
    "Several processes": ("distributed",),
    "Errors and warnings": ("CoRaError", "CoRaTraceError", "CoRaLoadError", "CoRaFloatWeightsWarning",
                            "CoRaDeprecationWarning"),
}

#: Public methods of classes documented with them.
METHODS = {"CoRaConfig": ("recommended", "replace", "to_dict", "from_dict"),
           "CoRaSummary": ("to_dict",), "RankSearchResult": ()}

HEADER = """# API reference

Generated from the docstrings by `python -m cora_fx.tools.api_doc docs/api.md` (tests/test_api_doc.py checks that
it is current and lists every public name). Everything here is importable from `cora_fx`; the package layout is in
[architecture.md](architecture.md), the method in [method.md](method.md).
"""


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _attributes(doc: str) -> tuple[str, dict[str, str]]:
    """The docstring without its ``Attributes:`` block, and that block as ``{field: meaning}``."""
    head, _, block = doc.partition("\nAttributes:\n")
    meanings: dict[str, str] = {}
    name = None
    for line in block.splitlines():
        match = re.match(r"    (\w+): (.*)", line)
        if match:
            name = match.group(1)
            meanings[name] = match.group(2).strip()
        elif name and line.strip():
            meanings[name] += " " + line.strip()
    return head.strip(), meanings


def _type_name(hint: Any) -> str:
    text = repr(hint) if not isinstance(hint, type) else hint.__name__
    return re.sub(r"typing\.|collections\.abc\.|cora_fx\.\w+\.", "", text).replace("NoneType", "None")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_group(cls: type) -> str:
    """A config group: its description and one table row per field."""
    head, meanings = _attributes(_doc(cls))
    hints = typing.get_type_hints(cls)
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append(f"| `{f.name}` | `{_cell(_type_name(hints[f.name]))}` | `{default!r}` | "
                    f"{_cell(meanings.get(f.name, ''))} |")
    return f"{head}\n\n" + "\n".join(rows)


def _signature(name: str, obj: Any) -> str:
    """``name(arguments) -> result`` with the annotations evaluated and shortened (no ``typing.`` prefixes)."""
    try:
        signature = inspect.signature(obj, eval_str=True)
    except (TypeError, ValueError, NameError):
        return ""
    text = re.sub(r"typing\.|collections\.abc\.|torch\.fx\.graph_module\.|torch\.nn\.modules\.module\.|"
                  r"cora_fx\.[\w.]+\.(?=[A-Z])", "", str(signature))
    return f"```text\n{name}{text.replace('NoneType', 'None')}\n```"


def entry(name: str, obj: Any) -> str:
    """The section of one public name."""
    if isinstance(obj, types.ModuleType):
        functions = [n for n, f in vars(obj).items() if inspect.isfunction(f) and f.__module__ == obj.__name__
                     and not n.startswith("_")]
        body = _doc(obj) + "\n\n" + "\n\n".join(f"#### `{name}.{n}`\n\n{_signature(n, getattr(obj, n))}\n\n"
                                                 f"{_doc(getattr(obj, n))}" for n in functions)
        return f"### `{name}` (module)\n\n{body}"
    if not callable(obj):
        return f"### `{name}`\n\n`{obj!r}`"
    kind = "class" if inspect.isclass(obj) else "function"
    group = inspect.isclass(obj) and dataclasses.is_dataclass(obj) and name.endswith("Config") and name != "CoRaConfig"
    body = config_group(obj) if group else _doc(obj)
    signature = "" if group else _signature(name, obj)  # a group's table lists its fields
    parts = [f"### `{name}` ({kind})", signature, body]
    for method in METHODS.get(name, ()):
        parts.append(f"#### `{name}.{method}`\n\n{_signature(method, getattr(obj, method))}\n\n"
                     f"{_doc(getattr(obj, method))}")
    return "\n\n".join(p for p in parts if p)


def conventions() -> str:
    """The tables that are data in the code: the steps' overrides and the names `replace` takes."""
    from cora_fx.config import FLAT_NAMES, STEP_OVERRIDES

    steps = ["| step | keyword overrides (for one call) |", "|---|---|"]
    steps += [f"| `{step}` | {', '.join(f'`{n}`' for n in names)} |" for step, names in STEP_OVERRIDES.items()]
    flat = ["| name | field |", "|---|---|"]
    flat += [f"| `{name}` | `{group}.{key}` |" for name, (group, key) in FLAT_NAMES.items()]
    return ("## Conventions\n\n"
            "Every data-aware step takes the prepared model and the calibration `batches` (any re-iterable of\n"
            "`(inputs, labels)`), `progress=`, and, as keyword overrides, the `CoRaConfig.replace` names of the\n"
            "settings it reads, validated by the config (`cora_fx.config.step_config`); any other keyword is\n"
            "refused.\n\n"
            + "\n".join(steps) + "\n\n`CoRaConfig.replace(**changes)` takes whole groups by group name, or single "
            "fields by these names:\n\n" + "\n".join(flat))


def render() -> str:
    """The whole of docs/api.md."""
    import cora_fx

    parts = [HEADER, conventions()]
    for title, names in SECTIONS.items():
        parts.append(f"## {title}")
        parts += [entry(name, getattr(cora_fx, name)) for name in names]
    return "\n\n".join(parts).rstrip() + "\n"


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "docs/api.md")
    path.write_text(render())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
