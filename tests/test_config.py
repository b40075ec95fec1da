from pathlib import Path

import pytest
import yaml

from distributed_je.config import SECTIONS, Config, ConfigError, load_config

BASE_YAML = Path(__file__).resolve().parents[1] / "tune_configs" / "base.yaml"


def test_base_yaml_spells_out_every_default():
    raw = yaml.safe_load(BASE_YAML.read_text())
    assert set(raw) == set(SECTIONS)
    defaults = Config().to_dict()
    for section, values in defaults.items():
        assert set(raw[section]) == set(values), f"base.yaml section {section!r} differs in keys"
    assert load_config(BASE_YAML) == Config()


def test_base_yaml_has_a_comment_on_every_key_line():
    for line in BASE_YAML.read_text().splitlines():
        if line.startswith("  ") and ":" in line:
            assert "#" in line, f"no comment on: {line!r}"


def test_overrides_are_typed_and_applied():
    config = load_config(BASE_YAML, ["loss.kl_weight=0.5", "model.variant=scvi", "data.batch_key=batch",
                                     "scaling.use_gpu=true", "optim.lr=1"])
    assert config.loss.kl_weight == 0.5 and config.model.variant == "scvi"
    assert config.data.batch_key == "batch" and config.scaling.use_gpu is True
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)


def test_unknown_key_names_it_and_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key in section 'loss': 'kl_wieght'; valid: .*kl_weight"):
        load_config(None, ["loss.kl_wieght=1"])
    with pytest.raises(ConfigError, match=r"unknown section: 'los'; valid: experiment, data"):
        Config.from_dict({"los": {}})


def test_out_of_range_names_key_value_and_range():
    with pytest.raises(ConfigError, match=r"loss\.kl_weight=-1\.0 is out of range: allowed \[0\.0, inf\]"):
        load_config(None, ["loss.kl_weight=-1"])
    with pytest.raises(ConfigError, match=r"optim\.lr=0\.0 is out of range: allowed \(0\.0, 10\.0\]"):
        load_config(None, ["optim.lr=0"])
    with pytest.raises(ConfigError, match=r"model\.variant='vae' is not allowed: choose one of scvi, thinning_only"):
        load_config(None, ["model.variant=vae"])


def test_wrong_types_are_refused():
    with pytest.raises(ConfigError, match=r"model\.n_latent='ten' has type str: expected int"):
        load_config(None, ["model.n_latent=ten"])
    with pytest.raises(ConfigError, match=r"model\.n_latent=1\.5 has type float: expected int"):
        load_config(None, ["model.n_latent=1.5"])
    with pytest.raises(ConfigError, match=r"scaling\.num_workers=True has type bool"):
        load_config(None, ["scaling.num_workers=true"])
    with pytest.raises(ConfigError, match="expected a finite number"):
        load_config(None, ["loss.kl_weight=.nan"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["loss.kl_weight"])
    with pytest.raises(ConfigError, match="section.key"):
        load_config(None, ["kl_weight=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")


def test_round_trip_through_a_plain_dict_and_frozen():
    config = load_config(None, ["tune.search_space={loss.kl_weight: {loguniform: [0.1, 10]}}"])
    assert Config.from_dict(config.to_dict()) == config
    with pytest.raises(AttributeError):
        config.loss.kl_weight = 3.0  # frozen


def test_replace_validates():
    config = Config()
    assert config.replace(**{"model.n_latent": 32}).model.n_latent == 32
    with pytest.raises(ConfigError, match="n_latent"):
        config.replace(**{"model.n_latent": 0})


def test_every_shipped_config_loads_and_its_search_space_parses():
    from distributed_je.tuning import parse_search_space

    for path in BASE_YAML.parent.glob("*.yaml"):
        parse_search_space(load_config(path))
