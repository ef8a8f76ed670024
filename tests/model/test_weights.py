"""Parameter names/shapes equal the release's mm_projector; mm_projector.bin round trips; release vs paper."""

import pytest
import torch

from model.checkpoint import RELEASE_PREFIX, load_mm_projector_state, save_mm_projector, strip_prefix
from model.compressor import HicomCompressor
from model.config import CompressorConfig, parse_spec

# The reference table (shared/reference/hicom.md), 7B sizes.
RELEASE_TABLE = {
    "local_compressor.readout.0.weight": (3584, 1152), "local_compressor.readout.0.bias": (3584,),
    "local_compressor.readout.2.weight": (3584, 3584), "local_compressor.readout.2.bias": (3584,),
    "global_compressor.query": (32, 1152),
    **{f"global_compressor.attn_layer.{p}_proj.weight": (1152, 1152) for p in "qkv"},
    **{f"global_compressor.attn_layer.{p}_proj.bias": (1152,) for p in "qkv"},
    "global_compressor.attn_layer.out_proj.weight": (1152, 1152),
    "global_compressor.attn_layer.out_proj.bias": (1152,),
    "global_compressor.readout.0.weight": (3584, 1152), "global_compressor.readout.0.bias": (3584,),
    "global_compressor.readout.2.weight": (3584, 3584), "global_compressor.readout.2.bias": (3584,),
}
PAPER_EXTRA = {
    "global_compressor.guide_injector.coarse_proj.0.weight": (2304, 1152),
    "global_compressor.guide_injector.coarse_proj.0.bias": (2304,),
    "global_compressor.guide_injector.coarse_proj.2.weight": (2304, 2304),
    "global_compressor.guide_injector.coarse_proj.2.bias": (2304,),
    "global_compressor.guide_injector.coarse_norm.weight": (1152,),
    "global_compressor.guide_injector.coarse_norm.bias": (1152,),
}


def meta_state(cfg):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in HicomCompressor(cfg).state_dict().items()}


def test_release_7b_state_dict_equals_reference_table():
    state = meta_state(CompressorConfig(spec="local43_global32", behaviour="release", use_guide="direct"))
    assert state == RELEASE_TABLE
    assert sum(torch.Size(s).numel() for s in state.values()) == 39_311_872


def test_paper_mode_adds_only_the_coarse_injector():
    state = meta_state(CompressorConfig(behaviour="paper"))
    assert state == {**RELEASE_TABLE, **PAPER_EXTRA}


def test_spec_parsing_and_quirk():
    assert parse_spec("local43_global32") == {"temporal_kernel": 4, "spatial_kernel": 3, "num_queries": 32,
                                              "global_suffix": None}
    assert parse_spec("local414_global16_fine")["spatial_kernel"] == 14
    release = CompressorConfig(spec="local43_global32_coarse", behaviour="release")
    assert (release.local_guide_mode, release.global_guide_mode) == ("direct", "direct")  # suffix ignored
    paper = CompressorConfig(spec="local43_global32_fine", behaviour="paper")
    assert (paper.local_guide_mode, paper.global_guide_mode) == ("direct", "fine")
    explicit = CompressorConfig(behaviour="release", local_guide="none", global_guide="coarse", temporal_kernel=2)
    assert (explicit.local_guide_mode, explicit.global_guide_mode, explicit.grid(8, 27, 27)) == ("none", "coarse",
                                                                                                 (4, 9, 9))
    for bad in ("local43adaptk_global32", "mlp2x_gelu", "local4_global32"):
        with pytest.raises(ValueError):
            parse_spec(bad)
    with pytest.raises(ValueError):
        CompressorConfig(behaviour="both")


def small(behaviour):
    torch.manual_seed(0)
    return HicomCompressor(CompressorConfig(behaviour=behaviour, vision_dim=16, key_dim=16, text_dim=16, llm_dim=12,
                                            head_dim=8))


@pytest.mark.parametrize("prefix", [RELEASE_PREFIX, ""])
def test_export_import_round_trip_is_exact(tmp_path, prefix):
    src = small("release")
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    path = tmp_path / "mm_projector.bin"
    save_mm_projector(src.state_dict(), str(path), prefix=prefix)
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith(prefix) for k in raw) and len(raw) == len(src.state_dict())
    dst = small("release")
    result = dst.load_state_dict(load_mm_projector_state(str(path)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    x = torch.randn(1, 4, 6, 6, 16)
    assert torch.equal(src(x, x, torch.randn(1, 16).fill_(0.5)), dst(x, x, torch.randn(1, 16).fill_(0.5)))


def test_full_model_state_dict_keeps_only_projector_keys():
    state = {"model.mm_projector.global_compressor.query": torch.zeros(2), "model.embed_tokens.weight": torch.zeros(3)}
    assert list(strip_prefix(state)) == ["global_compressor.query"]


def test_release_vs_paper_differ_only_as_documented():
    release, paper = small("release"), small("paper")
    with torch.no_grad():
        for p in release.parameters():
            p.normal_(std=0.3)
    result = paper.load_state_dict(release.state_dict(), strict=False)
    assert set(result.missing_keys) == set(PAPER_EXTRA)
    assert not result.unexpected_keys
    value, key, guide = torch.randn(2, 8, 6, 6, 16), torch.randn(2, 8, 6, 6, 16), torch.randn(2, 16)
    out_r, out_p = release(value, key, guide), paper(value, key, guide)
    n_local = 2 * 2 * 2
    torch.testing.assert_close(out_r[:, :n_local], out_p[:, :n_local])  # local level identical
    assert not torch.allclose(out_r[:, n_local:], out_p[:, n_local:])  # global level differs
    glob_r, glob_p = out_r[:, n_local:], out_p[:, n_local:]
    assert torch.allclose(glob_r, glob_r[:, :1].expand_as(glob_r))  # release: instruction repeated
    assert not torch.allclose(glob_p, glob_p[:, :1].expand_as(glob_p))  # paper: FiLM-ed learned queries
