"""Whole model on the tiny preset: collate, splice, frozen parts, overfitting, checkpoints, local loading."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from model import (CompressorConfig, build_model, expand_clip_sample, load_checkpoint_config,
                   release_7b_config, save_compressor_checkpoint, tiny_config)
from model.conversation import IGNORE_INDEX
from model.presets import tiny_guide_tokenizer, tiny_llm_tokenizer

ANSWERS = ["A red car drives.", "Two dogs play.", "A man cooks soup.", "Birds fly south."]


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(tiny_config())


def clip(i, n_frames=8, size=(112, 112), turns=1, seed=None):
    rng = np.random.default_rng(i if seed is None else seed)
    conv = []
    for j in range(turns):
        q = "<video>\nDescribe the video." if j == 0 else f"What else happens {j}?"
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": ANSWERS[(i + j) % len(ANSWERS)]}]
    frames = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n_frames)]
    return {"__key__": f"clip{i}", "frames": frames, "json": {"id": f"clip{i}", "conversations": conv}}


def test_expand_and_collate_shapes(tiny):
    sample = clip(0, turns=3)
    examples = expand_clip_sample(sample)
    assert [e["__key__"] for e in examples] == ["clip0/0", "clip0/1", "clip0/2"]
    assert all(e["frames"] is sample["frames"] for e in examples)
    batch = tiny.collate(examples)
    assert batch["pixel_values"].shape == (24, 3, 112, 112)
    assert batch["num_frames"].tolist() == [8, 8, 8]
    assert batch["guide_input_ids"].shape == batch["guide_attention_mask"].shape == (3, 64)
    # byte-level tiny tokenizer: one token per character plus </s>, the rest is masked padding
    assert batch["guide_attention_mask"].sum(1).tolist() == [len(t) + 1 for t in batch["guide_texts"]]
    assert batch["guide_texts"] == ["Describe the video.", "What else happens 1?", "What else happens 2?"]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    # right padding: padded positions are masked and unsupervised
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    supervised = (batch["labels"] != IGNORE_INDEX).sum(1)
    assert (supervised > 0).all() and (supervised < batch["attention_mask"].sum(1)).all()


def test_frames_any_format_are_padded_to_square_with_mean_colour(tiny):
    white = np.full((56, 112, 3), 255, dtype=np.uint8)  # wide frame
    buf = io.BytesIO()
    Image.fromarray(white).save(buf, format="PNG")
    pixels = tiny.processor.frames([white, Image.fromarray(white), buf.getvalue()])
    assert pixels.shape == (3, 3, 112, 112)
    pad_value = (127 / 255 - 0.5) / 0.5
    assert torch.allclose(pixels[:, :, :20], torch.full_like(pixels[:, :, :20], pad_value), atol=1e-6)
    assert torch.allclose(pixels[:, :, 40:70], torch.ones_like(pixels[:, :, 40:70]), atol=1e-6)
    big = tiny.processor.frames([np.zeros((384, 384, 3), np.uint8)])  # resized to the tower's size
    assert big.shape == (1, 3, 112, 112)


def test_visual_tokens_replace_placeholder(tiny):
    batch = tiny.collate([clip(0), clip(1, n_frames=1)])  # a clip and a single-frame "image"
    visual = tiny.encode_visual(batch["pixel_values"], batch["num_frames"], batch["guide_input_ids"],
                                batch["guide_attention_mask"])
    assert [v.shape for v in visual] == [(2 * 3 * 3 + 8, 64), (3 * 3 + 8, 64)]
    embeds, labels, mask = tiny.llm.splice(batch["input_ids"], batch["labels"], batch["attention_mask"], visual)
    lengths = batch["attention_mask"].sum(1) - 1 + torch.tensor([26, 17])
    assert mask.sum(1).tolist() == lengths.tolist()
    row = batch["input_ids"][0].tolist().index(-201)
    torch.testing.assert_close(embeds[0, row:row + 26], visual[0])
    assert (labels[0, row:row + 26] == IGNORE_INDEX).all()


def test_gradients_reach_only_the_compressor(tiny):
    tiny.zero_grad(set_to_none=True)
    loss = tiny(tiny.collate([clip(0), clip(1)]))
    loss.backward()
    with_grad = {n for n, p in tiny.named_parameters() if p.grad is not None}
    projector = {n for n, _ in tiny.named_parameters() if n.startswith("mm_projector.")}
    unused = {"mm_projector.global_compressor.query"}  # direct guide replaces the learned queries
    assert with_grad == projector - unused
    assert {n for n, _ in tiny.named_trainable_parameters()} == projector - unused
    assert all(not p.requires_grad for n, p in tiny.named_parameters() if not n.startswith("mm_projector."))
    assert sum(p.numel() for p in tiny.trainable_parameters()) < sum(p.numel() for p in tiny.parameters()) / 2
    tiny.zero_grad(set_to_none=True)


def test_tiny_model_overfits_a_handful_of_samples():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    batch = model.collate([clip(i) for i in range(4)])
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    first = None
    for _ in range(200):
        loss = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    model.eval()
    with torch.no_grad():
        final = model(batch).item()
        # the answers are told apart by the frames alone (same question): swapping frames must hurt
        swapped = dict(batch, pixel_values=torch.cat(batch["pixel_values"].split(8)[::-1]))
        shuffled = model(swapped).item()
    assert final <= 0.2 * first, (first, final)
    assert final <= 0.2 * math.log(len(model.processor.tokenizer)), final  # also far below a uniform guess
    assert shuffled > 3 * final, (final, shuffled)


def test_checkpoint_round_trip_on_full_model(tiny, tmp_path):
    with torch.no_grad():
        for p in tiny.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_compressor_checkpoint(tiny, str(tmp_path / "ckpt"), extra={"step": 3})
    config = load_checkpoint_config(str(tmp_path / "ckpt"))
    assert config == tiny.config
    other = build_model(config)
    result = other.load_mm_projector(str(tmp_path / "ckpt" / "mm_projector.bin"))
    assert not result.missing_keys and not result.unexpected_keys
    for (n, a), (_, b) in zip(tiny.mm_projector.state_dict().items(), other.mm_projector.state_dict().items()):
        assert torch.equal(a, b), n
    raw = torch.load(tmp_path / "ckpt" / "mm_projector.bin", weights_only=True)
    assert all(k.startswith("model.mm_projector.") for k in raw)


def test_release_preset_requires_local_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: .*missing-siglip"):
        build_model(release_7b_config(vision_tower_path=str(tmp_path / "missing-siglip"), llm_path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no local path"):
        build_model(release_7b_config(vision_tower_path=None, llm_path=None))


def test_release_loading_path_with_tiny_local_checkpoints(tmp_path):
    """The release-7b code path (local SigLIP + Qwen2 dirs) on tiny checkpoints written here."""
    from transformers import (Qwen2Config, Qwen2ForCausalLM, SiglipConfig, SiglipImageProcessor, SiglipModel)

    guide_tok, llm_tok = tiny_guide_tokenizer(), tiny_llm_tokenizer()
    siglip = SiglipModel(SiglipConfig(
        text_config=dict(vocab_size=len(guide_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, projection_size=32, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=56, patch_size=14)))
    siglip.save_pretrained(tmp_path / "siglip")
    guide_tok.save_pretrained(tmp_path / "siglip")
    SiglipImageProcessor(size={"height": 56, "width": 56}).save_pretrained(tmp_path / "siglip")
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(llm_tok), hidden_size=48, intermediate_size=96,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    qwen.save_pretrained(tmp_path / "qwen")
    llm_tok.save_pretrained(tmp_path / "qwen")

    comp = CompressorConfig(vision_dim=32, key_dim=32, text_dim=32, llm_dim=48, head_dim=16)
    config = release_7b_config(str(tmp_path / "siglip"), str(tmp_path / "qwen"), compressor=comp,
                               frozen_dtype="float32")
    model = build_model(config)
    assert model.llm.gradient_checkpointing
    # weights really came from the files
    torch.testing.assert_close(model.vision_tower.model.head.mlp.fc1.weight, siglip.vision_model.head.mlp.fc1.weight)
    torch.testing.assert_close(model.guide_encoder.model.head.weight, siglip.text_model.head.weight)
    batch = model.collate([clip(0, n_frames=4, size=(40, 70)), clip(1, n_frames=4)])
    assert batch["pixel_values"].shape == (8, 3, 56, 56)
    loss = model(batch)
    loss.backward()
    assert all(p.grad is not None for _, p in model.named_trainable_parameters())

    bad = release_7b_config(str(tmp_path / "siglip"), str(tmp_path / "qwen"), frozen_dtype="float32")
    with pytest.raises(ValueError, match="vision_dim=1152"):
        build_model(bad)
