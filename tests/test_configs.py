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


def _run_config(**changes):
    """run_cpu.yaml (the demo's config) with ``changes`` applied and validated again."""
    path = CONFIG_DIR / "run_cpu.yaml"
    return with_overrides(load_config(path, RunJobConfig), changes, source=str(path))


def test_device_and_dtype_default_to_auto_and_the_demo_still_loads_fp32():
    """Every model-loading section has device/dtype (default auto); the demo's student trains in fp32
    (DeepSpeed without bf16), so its load dtype is float32 whatever the device."""
    config = _run_config()
    assert all((t.device, t.dtype) == ("auto", "auto") for t in config.teachers)
    assert (config.extract.device, config.extract.dtype) == ("auto", "auto")
    assert config.student_placement() == {"device": "auto", "dtype": "float32"}
    gpu = load_config(CONFIG_DIR / "train_gpu.yaml", TrainJobConfig)
    assert gpu.student_placement() == {"device": "auto", "dtype": "auto"}  # bf16 on the GPU workers


@pytest.mark.parametrize("changes, message", [
    ({"extract.device": "cpu", "extract.dtype": "float16"}, r"extract: .*device: cpu with dtype: float16.*use dtype: "
                                                            r"auto or float32"),
    ({"student.dtype": "float16"}, r"student.dtype: float16 cannot be trained.*deepspeed.bf16: true"),
    ({"student.dtype": "bfloat16"}, r"student.dtype: bfloat16 without DeepSpeed bf16.*deepspeed.bf16: true"),
    ({"student.device": "cuda"}, r"student.device: cuda but ray.use_gpu: false.*set ray.use_gpu: true"),
    ({"ray.use_gpu": True, "student.device": "cpu"}, r"student.device: cpu but ray.use_gpu: true"),
    ({"student.dtype": "fp16"}, r"student.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
])
def test_device_and_dtype_mistakes_name_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        _run_config(**changes)
    # and the accepted combinations
    assert _run_config(**{"student.dtype": "bfloat16", "deepspeed.bf16": True}).student_placement()["dtype"] == "bfloat16"
    assert _run_config(**{"extract.dtype": "bfloat16"}).extract.dtype == "bfloat16"  # allowed on the CPU (warns at load)
