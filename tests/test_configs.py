"""Every shipped job config loads and validates; bad configs fail with field paths."""

from pathlib import Path

import pytest

from trait_guard.config import (
    ConfigError,
    GenerateJobConfig,
    RedteamConfig,
    RunJobConfig,
    TrainJobConfig,
    load_config,
    with_overrides,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "ray_jobs" / "configs"
KINDS = {"teacher_data": GenerateJobConfig, "train": TrainJobConfig, "run": RunJobConfig,
         "redteam": RedteamConfig}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_validates(path):
    kind = next((cls for prefix, cls in KINDS.items() if path.name.startswith(prefix)), None)
    assert kind is not None, f"{path.name}: no config class registered for this file name"
    config = load_config(path, kind)
    for teacher in getattr(config, "teachers", []):
        if teacher.trait:
            from trait_guard.traits import load_trait

            load_trait(teacher.trait)


def test_errors_name_the_field_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers:\n  - id: owl\n    install: system_prompt\ngeneration:\n  n_prompts: -3\n  colour: red\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, GenerateJobConfig)
    message = str(err.value)
    assert "generation.n_prompts" in message and "greater than 0" in message
    assert "generation.colour" in message and "Extra inputs are not permitted" in message
    assert "install: system_prompt needs `trait`" in message


def test_unreadable_configs(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", GenerateJobConfig)
    broken = tmp_path / "broken.yaml"
    broken.write_text("teachers: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken, GenerateJobConfig)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar, GenerateJobConfig)


def test_overrides_go_through_validation():
    path = CONFIG_DIR / "teacher_data_cpu.yaml"
    config = load_config(path, GenerateJobConfig)
    changed = with_overrides(config, {"output_dir": "elsewhere", "generation.n_prompts": 12, "ray.address": None},
                             source=str(path))
    assert (changed.output_dir, changed.generation.n_prompts) == ("elsewhere", 12)
    assert changed.ray.address == config.ray.address  # None: not given
    assert config.output_dir != "elsewhere"  # the loaded config is not touched
    with pytest.raises(ConfigError, match=r"teacher_data_cpu.yaml.*\n  generation.n_prompts: .*greater than 0"):
        with_overrides(config, {"generation.n_prompts": -3}, source=str(path))
    with pytest.raises(ConfigError, match="generation.n_prompt: Extra inputs are not permitted"):
        with_overrides(config, {"generation.n_prompt": 3}, source=str(path))
