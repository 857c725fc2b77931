"""`CoRaConfig`: groups, validation, the flat spelling of earlier releases, and the saved form."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from torch.ao.quantization.observer import MinMaxObserver

from cora_fx import (
    AdapterConfig,
    CoRaConfig,
    CoRaDeprecationWarning,
    QuantConfig,
    RefineConfig,
    RoundingConfig,
    SearchConfig,
    convert_cora,
    load,
    prepare_cora,
    read_summary,
    save,
    set_ranks,
    summary,
)
from cora_fx.config import CONFIG_VERSION, FLAT_NAMES, GROUPS

pytestmark = pytest.mark.unit


def module_level_loss(output, float_output, labels):
    return (output - float_output).pow(2).mean()


def test_groups_hold_the_papers_defaults_and_each_knob_lives_in_one_group():
    cfg = CoRaConfig()
    assert cfg == CoRaConfig(QuantConfig(), AdapterConfig(), RoundingConfig(), SearchConfig(), RefineConfig())
    assert (cfg.quant.bits, cfg.adapter.bits, cfg.rounding.method, cfg.search.budget, cfg.refine.bn_correction) == (
        4, 8, "nearest", 0.05, 0)
    fields = [(group, f.name) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)]
    assert sorted(FLAT_NAMES.values()) == sorted(fields)  # every field has exactly one flat name


def test_replace_takes_flat_names_and_whole_groups_and_validates():
    cfg = CoRaConfig().replace(bits=3, adapter_bits=None, rounding="gptq", budget=0.1, search=SearchConfig(lr=0.5))
    assert (cfg.quant.bits, cfg.adapter.bits, cfg.rounding.method, cfg.search.lr) == (3, None, "gptq", 0.5)
    assert cfg.search.budget == 0.1  # the flat change applies on top of the group given
    with pytest.raises(ValueError, match=r"CoRaConfig\.search\.budget=2"):
        cfg.replace(budget=2)
    with pytest.raises(ValueError, match="no field"):
        cfg.replace(nope=1)
    with pytest.raises(TypeError, match="CoRaConfig.quant must be a QuantConfig"):
        CoRaConfig(quant=SearchConfig())


def test_fields_are_set_through_groups_or_replace_and_read_through_groups():
    with pytest.raises(TypeError, match=r"CoRaConfig\(bits=\.\.\., budget=\.\.\., rounding=\.\.\.\).*replace"):
        CoRaConfig(bits=3, budget=0.04, rounding="gptq")
    cfg = CoRaConfig().replace(bits=3, rounding="gptq", budget=0.04)
    assert cfg.quant.bits == 3 and cfg.rounding.method == "gptq" and cfg.search.budget == 0.04
    with pytest.raises(AttributeError, match=r"read CoRaConfig\.search\.budget"):
        cfg.budget
    with pytest.raises(AttributeError, match="no attribute 'nope'$"):
        cfg.nope
    assert CoRaConfig(act_bits=8).act_bits == 8  # the one shorthand
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CoRaConfig.recommended(3).replace(bits=2)


def test_string_choices_are_typed_as_literals():
    import typing
    hints = typing.get_type_hints(QuantConfig)
    assert typing.get_args(hints["granularity"]) == ("per_tensor", "per_channel")
    assert typing.get_args(typing.get_type_hints(RoundingConfig)["method"]) == ("nearest", "gptq")


def test_from_dict_imports_only_trusted_modules_or_those_the_caller_names():
    data = CoRaConfig().to_dict()
    data["quant"]["clipping"] = {"callable": "os:system"}
    refused = r"quant\.clipping: the saved config names 'os:system'.*allowed_modules=\['os'\]"
    with pytest.raises(ValueError, match=refused):
        CoRaConfig.from_dict(data)
    data["quant"]["clipping"] = {"callable": "os.path:join"}  # a submodule of an untrusted module: refused too
    with pytest.raises(ValueError, match="allowed_modules"):
        CoRaConfig.from_dict(data)
    with pytest.raises(ValueError, match="allowed_modules"), pytest.warns(CoRaDeprecationWarning):
        CoRaConfig.from_dict({"clipping": {"callable": "subprocess:call"}})  # the flat layout too
    loss = CoRaConfig().replace(loss=module_level_loss).to_dict()
    with pytest.raises(ValueError, match=f"allowed_modules=\\['{__name__}'\\]"):
        CoRaConfig.from_dict(loss)
    assert CoRaConfig.from_dict(loss, allowed_modules=[__name__]).search.loss is module_level_loss
    observer = CoRaConfig().replace(clipping=MinMaxObserver).to_dict()
    assert CoRaConfig.from_dict(observer).quant.clipping is MinMaxObserver  # torch.ao observers are trusted
    from cora_fx.quant.observers import NormalObserver
    old = CoRaConfig().to_dict()
    old["quant"]["clipping"] = {"callable": "cora_fx.observers:NormalObserver"}  # saved before the move
    assert CoRaConfig.from_dict(old).quant.clipping is NormalObserver


def test_to_dict_is_json_and_round_trips_with_a_version():
    cfg = CoRaConfig.recommended(3, layer_bits={"features.1": 4}, loss=module_level_loss, clipping=MinMaxObserver,
                                 target_bits=3.25)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["version"] == CONFIG_VERSION and data["quant"]["layer_bits"] == {"features.1": 4}
    assert data["search"]["target_bits"] == 3.25
    with pytest.raises(ValueError, match="search.target_bits=0: must be None or a positive number"):
        cfg.replace(target_bits=0)
    assert data["search"]["loss"] == {"callable": f"{__name__}:module_level_loss"}
    assert CoRaConfig.from_dict(data, allowed_modules=[__name__]) == cfg
    flat = {"bits": 3, "budget": 0.04, "rounding": "gptq"}  # the flat layout of releases before 0.3, no version
    with pytest.warns(CoRaDeprecationWarning, match="save it again"):
        assert CoRaConfig.from_dict(flat) == CoRaConfig().replace(**flat)


def test_unsaveable_settings_and_bad_dicts_get_clear_errors():
    cfg = CoRaConfig().replace(loss=lambda out, ref, labels: out.sum())
    with pytest.raises(ValueError, match=r"CoRaConfig\.search\.loss=.*cannot be saved"):
        cfg.to_dict()
    marked = cfg.to_dict(strict=False)
    assert "unserialisable" in marked["search"]["loss"]
    with pytest.raises(ValueError, match="pass that setting again"):
        CoRaConfig.from_dict(marked)
    with pytest.raises(ValueError, match="newer than this cora_fx"):
        CoRaConfig.from_dict({"version": CONFIG_VERSION + 1})
    with pytest.raises(ValueError, match=r"unknown group\(s\) \['extra'\]"):
        CoRaConfig.from_dict({"version": CONFIG_VERSION, "extra": {}})
    with pytest.raises(ValueError, match=r"search has no field\(s\) \['bits'\]"):
        CoRaConfig.from_dict({"version": CONFIG_VERSION, "search": {"bits": 3}})


def test_the_saved_artifact_records_the_config_and_the_summary_shows_it(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    cfg = CoRaConfig().replace(bits=3, granularity="per_channel", budget=0.2, layer_bits={"2": 5})
    prepared = prepare_cora(net, cfg)
    set_ranks(prepared, "heuristic")
    quantized = convert_cora(prepared)
    x = torch.randn(2, 3, 8, 8)
    path = save(quantized, tmp_path / "m.pt2", (x,))
    report = read_summary(path)
    assert CoRaConfig.from_dict(report.config) == cfg
    assert load(path).meta["cora_fx_summary"].config == report.config
    text = str(summary(quantized))
    assert f"config (version {CONFIG_VERSION}):" in text and "quant: bits=3" in text and "'2': 5" in text


def test_every_step_takes_the_settings_it_reads_as_validated_overrides():
    from cora_fx.config import STEP_OVERRIDES, step_config

    cfg = CoRaConfig()
    assert step_config(cfg, "finetune", {"finetune_iterations": 5}).refine.finetune_iterations == 5
    assert step_config(cfg, "correct_batchnorm", {}) is cfg
    with pytest.raises(ValueError, match=r"CoRaConfig\.refine\.finetune_lr=0: must be > 0"):
        step_config(cfg, "finetune", {"finetune_lr": 0})
    with pytest.raises(TypeError, match=r"calibrate_rounding: unexpected keyword\(s\) \['budget'\]"):
        step_config(cfg, "calibrate_rounding", {"budget": 0.1})
    every = {name for names in STEP_OVERRIDES.values() for name in names}
    assert every <= set(FLAT_NAMES)  # the vocabulary of replace(), nothing new to learn
    import inspect

    import cora_fx
    for step in STEP_OVERRIDES:
        parameters = inspect.signature(getattr(cora_fx, step)).parameters
        assert list(parameters)[:2] == ["prepared", "batches"], step
        assert parameters["overrides"].kind is inspect.Parameter.VAR_KEYWORD, step
