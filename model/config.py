"""Typed configuration for the HICom model: the compressor (`mm_projector`) and the whole
conditional pre-training model (towers + compressor + LLM).

A config is a plain dataclass, so a checkpoint can store it as JSON (`to_dict` / `from_dict`) and
rebuild the exact same model. The compressor accepts the release's spec string
(`local43_global32`) and explicit fields; explicit fields win over the spec.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

GUIDE_MODES = ("none", "direct", "coarse", "fine")
BEHAVIOURS = ("release", "paper")

_LOCAL_RE = re.compile(r"local(\d+)")
_GLOBAL_RE = re.compile(r"global(\d+)")
_GLOBAL_SUFFIX_RE = re.compile(r"global\d+_(direct|coarse|fine)\b")


def parse_spec(spec: str) -> dict[str, int | str | None]:
    """Parse a release projector spec such as `local43_global32` or `local43_global32_coarse`.

    Returns `temporal_kernel`, `spatial_kernel` (None without a local level), `num_queries` (None
    without a global level) and `global_suffix` (the trailing guide word, e.g. `coarse`, or None).
    Like the release, the first digit after `local` is the temporal kernel and the rest (1-2 digits)
    the spatial kernel. Options the release had but this port does not (`adapt*`, `guide*`) are
    rejected loudly instead of being silently ignored.
    """
    if "adapt" in spec or "guide" in spec:
        raise ValueError(f"projector spec {spec!r}: 'adapt'/'guide' options are not supported")
    out: dict[str, int | str | None] = {
        "temporal_kernel": None, "spatial_kernel": None, "num_queries": None, "global_suffix": None,
    }
    local = _LOCAL_RE.search(spec)
    if local:
        digits = local.group(1)
        if len(digits) not in (2, 3):
            raise ValueError(f"projector spec {spec!r}: local needs 2-3 digits (tK sK), got {digits!r}")
        out["temporal_kernel"] = int(digits[0])
        out["spatial_kernel"] = int(digits[1:])
    glob = _GLOBAL_RE.search(spec)
    if glob:
        out["num_queries"] = int(glob.group(1))
        suffix = _GLOBAL_SUFFIX_RE.search(spec)
        out["global_suffix"] = suffix.group(1) if suffix else None
    if not local and not glob:
        raise ValueError(f"projector spec {spec!r} has neither a local nor a global level")
    return out


@dataclass
class CompressorConfig:
    """HICom compressor (the release's `mm_projector`).

    `behaviour` selects how instruction (guide) injection is wired when `local_guide`/`global_guide`
    are not set explicitly:
      - `release`: what the released code does. The spec's `_coarse` suffix is never parsed, so both
        levels use `use_guide` (the release's `--use_guide direct`); at the global level the learned
        queries are then replaced by the instruction embedding repeated `num_queries` times.
      - `paper`: `use_guide` at the local level and `coarse` (FiLM) at the global level, or the
        spec's global suffix (`_direct`/`_coarse`/`_fine`) when one is given.
    Dims default to the release (SigLIP so400m 1152-d, Qwen2.5-7B 3584-d).
    """

    spec: str = "local43_global32"
    behaviour: str = "release"
    use_guide: str = "direct"  # the release's --use_guide: none | direct | coarse | fine
    local_guide: str | None = None  # explicit override of the local level's guide mode
    global_guide: str | None = None  # explicit override of the global level's guide mode
    temporal_kernel: int | None = None  # None: from spec
    spatial_kernel: int | None = None  # None: from spec
    num_queries: int | None = None  # None: from spec
    use_local: bool | None = None  # None: from spec (a `local..` part present)
    use_global: bool | None = None  # None: from spec (a `global..` part present)
    vision_dim: int = 1152  # VALUE features (release mm_hidden_size)
    key_dim: int = 1152  # KEY features for the local level (release qk_dim)
    text_dim: int = 1152  # instruction embedding (SigLIP text pooler / head output)
    llm_dim: int = 3584  # LLM hidden size (readout output)
    head_dim: int = 128  # global attention / fine injector heads = dim // head_dim (release: 128)
    mlp_depth: int = 2  # readout MLP depth: Linear, (GELU, Linear) * (depth - 1)
    norm_eps: float = 1e-6  # LayerNorm eps of the injectors (release: 1e-6)

    def __post_init__(self) -> None:
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour must be one of {BEHAVIOURS}, got {self.behaviour!r}")
        parsed = parse_spec(self.spec)
        if self.temporal_kernel is None:
            self.temporal_kernel = parsed["temporal_kernel"] or 1
        if self.spatial_kernel is None:
            self.spatial_kernel = parsed["spatial_kernel"] or 1
        if self.num_queries is None:
            self.num_queries = parsed["num_queries"] or 0
        if self.use_local is None:
            self.use_local = parsed["temporal_kernel"] is not None
        if self.use_global is None:
            self.use_global = parsed["num_queries"] is not None
        self._global_suffix = parsed["global_suffix"]
        for name in ("use_guide", "local_guide", "global_guide"):
            value = getattr(self, name)
            if value is not None and value not in GUIDE_MODES:
                raise ValueError(f"{name} must be one of {GUIDE_MODES}, got {value!r}")
        if not (self.use_local or self.use_global):
            raise ValueError("compressor needs a local or a global level")
        if self.use_global and self.vision_dim % self.head_dim:
            raise ValueError(f"vision_dim {self.vision_dim} not divisible by head_dim {self.head_dim}")
        if self.behaviour == "release" and self._global_suffix:
            logger.debug("release behaviour: spec suffix %r is ignored (as in the release)", self._global_suffix)

    @property
    def local_guide_mode(self) -> str:
        """Guide mode actually used at the local level."""
        if self.local_guide is not None:
            return self.local_guide
        return self.use_guide

    @property
    def global_guide_mode(self) -> str:
        """Guide mode actually used at the global level (see the class docstring)."""
        if self.global_guide is not None:
            return self.global_guide
        if self.behaviour == "release" or self.use_guide == "none":
            return self.use_guide
        return self._global_suffix or "coarse"

    @property
    def uses_guide(self) -> bool:
        """True when any level consumes the instruction embedding (the text tower is needed)."""
        modes = []
        if self.use_local:
            modes.append(self.local_guide_mode)
        if self.use_global:
            modes.append(self.global_guide_mode)
        return any(m != "none" for m in modes)

    @property
    def uses_guide_tokens(self) -> bool:
        """True when a level uses `fine` injection (token-level instruction features)."""
        return (self.use_local and self.local_guide_mode == "fine") or (
            self.use_global and self.global_guide_mode == "fine"
        )

    def grid(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """Local output grid (t', h', w') for an input of t frames of h x w patches.

        One frame is an image: the temporal kernel is 1 (as in the release)."""
        kt = 1 if t == 1 else self.temporal_kernel
        ks = self.spatial_kernel
        return (-(-t // kt), -(-h // ks), -(-w // ks))

    def num_tokens(self, t: int, h: int, w: int) -> int:
        """Number of visual tokens the compressor emits for t frames of h x w patches."""
        local = 0
        if self.use_local:
            gt, gh, gw = self.grid(t, h, w)
            local = gt * gh * gw
        return local + (self.num_queries if self.use_global else 0)


@dataclass
class TinySizes:
    """Sizes of the randomly initialised towers and LLM of the `tiny` preset (tests and demo)."""

    image_size: int = 112  # px; 112 / 14 = 8 x 8 patches per frame
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_init_std: float = 0.3  # large enough that a frozen random LLM can be steered by its inputs
    seed: int = 0  # random init is seeded so two builds give the same frozen towers


@dataclass
class HicomConfig:
    """Whole conditional pre-training model: SigLIP vision + text towers, compressor, Qwen2 LLM.

    `preset` is `tiny` (random init from `tiny`, offline, CPU) or `release-7b` (SigLIP so400m and
    Qwen2.5-7B-Instruct from the local paths `vision_tower_path` and `llm_path`; never downloaded).
    """

    preset: str = "tiny"
    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    vision_tower_path: str | None = None  # local SigLIP checkpoint dir (vision + text + tokenizer)
    llm_path: str | None = None  # local Qwen2 checkpoint dir (weights + tokenizer)
    tiny: TinySizes = field(default_factory=TinySizes)
    vision_select_layer: int = -2  # VALUE = hidden_states[select_layer] (release -2)
    guide_max_length: int = 64  # instruction tokens for the text tower (SigLIP max 64)
    num_frames: int = 32  # frames per example fed to the compressor (the release's --num_frames, 32)
    max_length: int = 4096  # LLM sequence cap after the visual tokens are spliced in
    system_prompt: str | None = None  # None: the LLM tokenizer's template default (release); a string forces one
    guide_text_quirks: bool | None = None  # release's str.lstrip("Question: "); None: on in release behaviour
    frozen_dtype: str = "float32"  # dtype of the frozen towers and LLM (bfloat16 for 7B on GPU)
    gradient_checkpointing: bool = False  # checkpoint the LLM layers (7B); grads still reach inputs

    @property
    def use_guide_text_quirks(self) -> bool:
        """Whether guide text extraction copies the release's `lstrip` quirk (default: release behaviour)."""
        if self.guide_text_quirks is None:
            return self.compressor.behaviour == "release"
        return self.guide_text_quirks

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; `from_dict` restores an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HicomConfig":
        """Inverse of `to_dict`; unknown keys are an error so a stale checkpoint fails loudly."""
        data = dict(data)
        comp = CompressorConfig(**data.pop("compressor", {}))
        tiny = TinySizes(**data.pop("tiny", {}))
        return cls(compressor=comp, tiny=tiny, **data)
