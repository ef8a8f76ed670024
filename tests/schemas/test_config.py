import pydantic
import pytest
import yaml

from conftest import REPO
from schemas.config import RunConfig, load_run_config
from schemas.overrides import OverrideError, apply_overrides, parse_set_options


def test_every_shipped_config_validates():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        if "train" not in path.name and "caption" not in path.name:
            load_run_config(path)


def test_overrides_and_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("split:\n  mode: fixed\n")
    cfg = load_run_config(path, parse_set_options(["clip.frames_per_clip=16", "shard.max_samples=5", "input.path=/x"]))
    assert (cfg.split.mode, cfg.clip.frames_per_clip, cfg.shard.max_samples, cfg.input.path) == ("fixed", 16, 5, "/x")
    assert RunConfig().clip.frame_size_px == 384 and RunConfig().clip.frames_per_clip == 32


def test_bad_configs_fail_at_start(tmp_path):
    with pytest.raises(pydantic.ValidationError):
        RunConfig.model_validate({"split": {"mode": "sideways"}})
    with pytest.raises(pydantic.ValidationError):
        RunConfig.model_validate({"clip": {"num_framez": 3}})  # typos are errors, not ignored
    with pytest.raises(pydantic.ValidationError):
        RunConfig.model_validate({"split": {"min_clip_s": 5, "max_clip_s": 2}})
    path = tmp_path / "list.yaml"
    path.write_text("- a\n")
    with pytest.raises(ValueError, match="mapping"):
        load_run_config(path)


def test_ray_cluster_yaml_keeps_token_auth_and_has_all_node_types():
    spec = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    assert set(spec["available_node_types"]) == {"head", "cpu_video", "gpu"}
    assert spec["available_node_types"]["gpu"]["resources"]["GPU"] >= 1
    start = " ".join(spec["head_start_ray_commands"] + spec["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "disabled" not in start
    assert "--dashboard-host=127.0.0.1" in start


def test_set_options_parse_once_and_apply_without_mutating():
    assert parse_set_options(["a.b=1", "a.c=x=y", "d= [1, 2]", "e="]) == {"a.b": 1, "a.c": "x=y", "d": [1, 2], "e": None}
    for bad in (["clip.frames_per_clip"], ["=3"]):
        with pytest.raises(OverrideError, match="KEY=VALUE"):
            parse_set_options(bad)
    data = {"clip": {"frames_per_clip": 8}}
    assert apply_overrides(data, {"clip.frames_per_clip": 4, "new.deep.key": True}) == {
        "clip": {"frames_per_clip": 4}, "new": {"deep": {"key": True}}}
    assert data == {"clip": {"frames_per_clip": 8}}
    with pytest.raises(OverrideError, match="not a section"):
        apply_overrides({"clip": 3}, {"clip.frames_per_clip": 4})


@pytest.mark.parametrize("data, new", [
    ({"clip": {"num_frames": 8}}, "clip.frames_per_clip"),
    ({"captioning": {"caption": {"num_frames": 2}}}, "captioning.caption.images_per_request"),
    ({"captioning": {"instruct": {"num_frames": 2}}}, "captioning.instruct.images_per_request"),
    ({"recipe": {"categories": {"sentences": ["A video about cooking."], "num_frames": 4}}},
     "recipe.categories.frames_per_video"),
    ({"captioning": {"caption": {"prompt": "These $num_frames frames ..."}}}, "$images_sent"),
])
def test_a_renamed_key_fails_at_load_in_one_line_naming_the_new_name(data, new):
    from schemas.config_base import RenamedKey

    with pytest.raises(RenamedKey) as err:
        RunConfig.model_validate(data)
    assert "was renamed" in str(err.value) and str(err.value).rstrip("`").endswith(new) and "\n" not in str(err.value)
    assert not isinstance(err.value, ValueError)  # pydantic passes it through: no multi-line validation report


def test_ray_data_knobs_of_older_run_directories_load_with_a_warning(caplog):
    cfg = RunConfig.model_validate({"ray": {"probe_concurrency": 4, "op_resource_reservation": False,
                                            "max_video_tasks": 3}})
    assert cfg.ray.max_video_tasks == 3 and "probe_concurrency" not in cfg.ray.model_dump()
    assert "`op_resource_reservation` is ignored" in caplog.text and "`probe_concurrency` is ignored" in caplog.text
