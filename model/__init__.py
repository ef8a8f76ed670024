"""HICom compressor and conditional pre-training model, weight-compatible with the release.

Entry points for the trainer:
    config = tiny_config()  /  release_7b_config(vision_tower_path=..., llm_path=...)
    model = build_model(config, device)
    examples = expand_clip_sample(shard_sample)          # one example per turn
    batch = model.processor.collate(examples)            # or collate(examples, model.processor)
    loss = model(batch); loss.backward()                 # grads reach only model.trainable_parameters()
    model.save_mm_projector(path) / model.load_mm_projector(path)
"""

from .checkpoint import (load_checkpoint_config, load_mm_projector_state, save_compressor_checkpoint,
                         save_mm_projector)
from .collate import HicomProcessor, collate, expand_clip_sample, move_batch
from .compressor import HicomCompressor
from .config import CompressorConfig, HicomConfig, TinySizes, parse_spec
from .conversation import IGNORE_INDEX, VIDEO_TOKEN_INDEX, expand_turns, extract_guide_text, tokenize_example
from .hicom import HicomForConditionalPretraining
from .presets import PRESETS, build_model, get_config, release_7b_config, tiny_config

__all__ = [
    "CompressorConfig", "HicomCompressor", "HicomConfig", "HicomForConditionalPretraining", "HicomProcessor",
    "IGNORE_INDEX", "PRESETS", "TinySizes", "VIDEO_TOKEN_INDEX", "build_model", "collate", "expand_clip_sample",
    "expand_turns", "extract_guide_text", "get_config", "load_checkpoint_config", "load_mm_projector_state",
    "move_batch", "parse_spec", "release_7b_config", "save_compressor_checkpoint", "save_mm_projector",
    "tiny_config", "tokenize_example",
]
