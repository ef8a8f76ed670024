"""Model presets and the one entry point `build_model(config)`.

- `tiny`: random-init SigLIP vision + text towers and a 2-layer Qwen2, built from configs with
  offline byte-level tokenizers; 8 frames of 8 x 8 patches, `local43_global8` (26 visual tokens).
  Runs on CPU in seconds: the test and demo model.
- `release-7b`: SigLIP so400m-patch14-384 + Qwen2.5-7B-Instruct from local directories
  (`vision_tower_path`, `llm_path`), `local43_global32`; nothing is ever downloaded.
"""

from __future__ import annotations

import logging

import torch

from .collate import HicomProcessor
from .config import CompressorConfig, HicomConfig, TinySizes
from .hicom import HicomForConditionalPretraining
from .llm import HicomLLM, load_qwen2
from .towers import FrameProcessor, GuideEncoder, VisionTower, load_siglip

logger = logging.getLogger(__name__)

PRESETS = ("tiny", "release-7b")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<video>")


def tiny_config(**overrides) -> HicomConfig:
    """Config of the `tiny` preset; keyword overrides replace top-level fields."""
    t = TinySizes()
    comp = CompressorConfig(spec="local43_global8", vision_dim=t.vision_hidden, key_dim=t.vision_hidden,
                            text_dim=t.text_hidden, llm_dim=t.llm_hidden, head_dim=16)
    base = dict(preset="tiny", compressor=comp, tiny=t, num_frames=8, max_length=1024, frozen_dtype="float32")
    base.update(overrides)
    return HicomConfig(**base)


def release_7b_config(vision_tower_path: str, llm_path: str, **overrides) -> HicomConfig:
    """Config of the `release-7b` preset (local checkpoint paths required)."""
    base = dict(preset="release-7b", compressor=CompressorConfig(), vision_tower_path=vision_tower_path,
                llm_path=llm_path, num_frames=32, max_length=4096, frozen_dtype="bfloat16",
                gradient_checkpointing=True)
    base.update(overrides)
    return HicomConfig(**base)


def get_config(name: str, **kwargs) -> HicomConfig:
    """Preset config by name (`tiny` or `release-7b`)."""
    if name == "tiny":
        return tiny_config(**kwargs)
    if name == "release-7b":
        return release_7b_config(**kwargs)
    raise ValueError(f"unknown preset {name!r}; known: {PRESETS}")


def byte_level_tokenizer(special_tokens: tuple[str, ...], template_eos: str | None = None, **kwargs):
    """Offline byte-level tokenizer (256 byte symbols, no merges) plus special tokens, wrapped in a
    `PreTrainedTokenizerFast`. `template_eos` appends that token to every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special_tokens))
    if template_eos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {template_eos}", special_tokens=[(template_eos, tok.token_to_id(template_eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


# Qwen2.5-Instruct's chat behaviour for the tiny LLM: turns as <|im_start|>role\n...<|im_end|>\n and a default
# system prompt when the messages bring none (written here; a real checkpoint brings its own template).
TINY_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def tiny_llm_tokenizer():
    """Qwen-style tokenizer for the tiny LLM: `<|im_start|>`, `<|im_end|>`, `<|endoftext|>` (pad), `<video>`,
    with a Qwen-style chat template (default system prompt included)."""
    tok = byte_level_tokenizer(QWEN_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_guide_tokenizer(max_length: int = 64):
    """SigLIP-style tokenizer for the tiny text tower: appends `</s>` and pads with `</s>`."""
    return byte_level_tokenizer(("</s>", "<unk>"), template_eos="</s>", pad_token="</s>", unk_token="<unk>",
                                eos_token="</s>", model_max_length=max_length)


def _build_tiny(config: HicomConfig):
    from transformers import (Qwen2Config, Qwen2ForCausalLM, SiglipTextConfig, SiglipTextModel,
                              SiglipVisionConfig, SiglipVisionModel)

    t = config.tiny
    tokenizer, guide_tokenizer = tiny_llm_tokenizer(), tiny_guide_tokenizer(config.guide_max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        vision = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=t.vision_hidden, intermediate_size=2 * t.vision_hidden, num_hidden_layers=t.vision_layers,
            num_attention_heads=t.vision_heads, image_size=t.image_size, patch_size=t.patch_size))
        text = SiglipTextModel(SiglipTextConfig(
            vocab_size=len(guide_tokenizer), hidden_size=t.text_hidden, intermediate_size=2 * t.text_hidden,
            num_hidden_layers=t.text_layers, num_attention_heads=t.text_heads, projection_size=t.text_hidden,
            max_position_embeddings=config.guide_max_length, pad_token_id=guide_tokenizer.pad_token_id,
            bos_token_id=guide_tokenizer.eos_token_id, eos_token_id=guide_tokenizer.eos_token_id))
        llm = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=t.llm_hidden, intermediate_size=2 * t.llm_hidden,
            num_hidden_layers=t.llm_layers, num_attention_heads=t.llm_heads, num_key_value_heads=t.llm_kv_heads,
            max_position_embeddings=max(config.max_length, 1024), tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            initializer_range=t.llm_init_std))
    frames = FrameProcessor(image_size=t.image_size)
    return vision.eval(), text.eval(), llm.eval(), tokenizer, guide_tokenizer, frames


def _build_release(config: HicomConfig):
    dtype = getattr(torch, config.frozen_dtype)
    need_text = config.compressor.uses_guide
    vision, text, frames = load_siglip(config.vision_tower_path, dtype, need_text)
    llm, tokenizer = load_qwen2(config.llm_path, dtype)
    guide_tokenizer = None
    if need_text:
        from transformers import AutoTokenizer

        guide_tokenizer = AutoTokenizer.from_pretrained(config.vision_tower_path, local_files_only=True)
    return vision, text, llm, tokenizer, guide_tokenizer, frames


def _check_dims(config: HicomConfig, vision, text, llm) -> None:
    c = config.compressor
    checks = [("vision_dim", c.vision_dim, vision.config.hidden_size), ("llm_dim", c.llm_dim, llm.config.hidden_size)]
    if c.use_local and c.local_guide_mode != "none":
        checks.append(("key_dim", c.key_dim, vision.config.hidden_size))
    if text is not None:
        checks.append(("text_dim", c.text_dim, text.config.projection_size))
    for name, want, got in checks:
        if want != got:
            raise ValueError(f"compressor {name}={want} does not match the loaded model ({got})")


def build_model(config: HicomConfig, device: torch.device | str | None = None) -> HicomForConditionalPretraining:
    """Build the conditional pre-training model for a preset config.

    Frozen towers and LLM get `config.frozen_dtype`; the compressor stays float32 (use autocast for
    bf16 compute). Raises FileNotFoundError for a missing local checkpoint path and ValueError when
    the compressor dims do not match the loaded towers.
    """
    if config.preset == "tiny":
        parts = _build_tiny(config)
    elif config.preset == "release-7b":
        parts = _build_release(config)
    else:
        raise ValueError(f"unknown preset {config.preset!r}; known: {PRESETS}")
    vision, text, llm, tokenizer, guide_tokenizer, frames = parts
    if not config.compressor.uses_guide:
        text, guide_tokenizer = None, None
    _check_dims(config, vision, text, llm)
    dtype = getattr(torch, config.frozen_dtype)
    processor = HicomProcessor(tokenizer=tokenizer, guide_tokenizer=guide_tokenizer, frames=frames,
                               system_prompt=config.system_prompt, guide_max_length=config.guide_max_length,
                               guide_text_quirks=config.use_guide_text_quirks)
    model = HicomForConditionalPretraining(
        config,
        VisionTower(vision.to(dtype), config.vision_select_layer),
        GuideEncoder(text.to(dtype)) if text is not None else None,
        HicomLLM(llm.to(dtype), config.max_length, config.gradient_checkpointing),
        processor,
    )
    if device is not None:
        model.to(device)
    logger.info("built %s model: %d trainable compressor parameters", config.preset,
                sum(p.numel() for p in model.trainable_parameters()))
    return model
