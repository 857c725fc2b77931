"""`CoRaConfig`: groups, validation, the flat spelling of earlier releases, and the saved form."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from torch.ao.quantization.observer import MinMaxObserver

from cora_fx import (AdapterConfig, CoRaConfig, CoRaDeprecationWarning, QuantConfig, RefineConfig, RoundingConfig,
                     SearchConfig, convert_cora, load, prepare_cora, read_summary, save, set_ranks, summary)
from cora_fx.config import CONFIG_VERSION, FLAT_NAMES, GROUPS


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


def test_flat_keywords_and_reads_of_earlier_releases_still_work_with_a_deprecation_warning():
    with pytest.warns(CoRaDeprecationWarning, match="flat keywords are deprecated"):
        old = CoRaConfig(bits=3, rounding="gptq", budget=0.04)
    assert old == CoRaConfig().replace(bits=3, rounding="gptq", budget=0.04)
    with pytest.warns(CoRaDeprecationWarning, match=r"read CoRaConfig\.search\.budget"):
        assert old.budget == 0.04
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        old.nope
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CoRaConfig.recommended(3).replace(bits=2)  # the supported spellings do not warn


def test_to_dict_is_json_and_round_trips_with_a_version():
    cfg = CoRaConfig.recommended(3, layer_bits={"features.1": 4}, loss=module_level_loss, clipping=MinMaxObserver,
                                 target_bits=3.25)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["version"] == CONFIG_VERSION and data["quant"]["layer_bits"] == {"features.1": 4}
    assert data["search"]["target_bits"] == 3.25
    with pytest.raises(ValueError, match="search.target_bits=0: must be None or a positive number"):
        cfg.replace(target_bits=0)
    assert data["search"]["loss"] == {"callable": f"{__name__}:module_level_loss"}
    assert CoRaConfig.from_dict(data) == cfg
    flat = {"bits": 3, "budget": 0.04, "rounding": "gptq"}  # the flat layout, no version
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
