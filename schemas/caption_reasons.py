"""Reason codes of the captioning stages (caption, instruct, filter). One code per way a caption or a pair
can be lost, so SQL can group by them. Kept apart from `schemas/reasons.py` (the video path's codes)."""

# caption
NO_CAPTION = "no_caption"  # no source caption and no VLM configured
CAPTION_REQUEST_FAILED = "caption_request_failed"  # the VLM refused the request (4xx other than 408/429)
CAPTION_UNAVAILABLE = "caption_unavailable"  # the VLM endpoint stayed unreachable/overloaded past the retries
CAPTION_EMPTY = "caption_empty"  # the VLM answered nothing usable (after the retries; never cached)
ENDPOINT_REJECTED = "endpoint_rejected"  # 401/403/404: wrong key, model or path; the run stops (exit 2)
# instruct (one failure per expected pair id `<clip_id>-<prompt_version>-q<i>`)
LLM_REQUEST_FAILED = "llm_request_failed"  # the endpoint refused the request (4xx other than 408/429)
LLM_UNAVAILABLE = "llm_unavailable"  # timeouts, connection errors, 429 or 5xx past the retry budget
LLM_MALFORMED_JSON = "llm_malformed_json"  # not JSON even after repair
LLM_SCHEMA_INVALID = "llm_schema_invalid"  # JSON that does not validate into the pairs schema
LLM_MISSING_PAIR = "llm_missing_pair"  # fewer valid pairs than asked for
LLM_TRUNCATED = "llm_truncated"  # the answer hit max_tokens and could not be salvaged
# filter: rules on one pair
EMPTY_TEXT = "empty_text"
INSTRUCTION_TOO_SHORT = "instruction_too_short"
INSTRUCTION_TOO_LONG = "instruction_too_long"
ANSWER_TOO_SHORT = "answer_too_short"
ANSWER_TOO_LONG = "answer_too_long"
REPETITIVE = "repetitive_text"
REFUSAL = "refusal"
INVALID_ANSWER = "invalid_answer"  # "not provide", "not describe", ... (HICom-248K's filter; phrases in config)
ANSWER_COPIES_INSTRUCTION = "answer_copies_instruction"
WRONG_LANGUAGE = "wrong_language"
BAD_MULTIPLE_CHOICE = "bad_multiple_choice"
MENTIONS_CAPTION = "mentions_caption"  # talks about "the description/caption" instead of the video
# filter: duplicates
DUPLICATE_INSTRUCTION = "duplicate_instruction"  # same normalized instruction in the clip
NEAR_DUPLICATE_INSTRUCTION = "near_duplicate_instruction"  # embedding or token overlap above threshold
OVERUSED_INSTRUCTION = "overused_instruction"  # seen too often across the dataset
DUPLICATE_CLIP = "duplicate_clip"  # frame hashes close to an earlier clip (same video or dataset)
# filter: model scores
LOW_RELEVANCE = "low_relevance"  # answer does not address the instruction (sentence encoder)
NOT_GROUNDED = "not_grounded"  # answer not supported by the dense caption (sentence encoder)
NOT_GROUNDED_LEXICAL = "not_grounded_lexical"  # answer words absent from the caption
INSTRUCTION_NOT_GROUNDED = "instruction_not_grounded"  # asks about things the caption never mentions

# A video with one of these is not committed: the endpoint was away, so a rerun (same command) retries it,
# and responses that did arrive come from the cache.
RETRY_LATER = frozenset({CAPTION_UNAVAILABLE, LLM_UNAVAILABLE})
# A video with this failure stops the run before anything of its batch is committed (exit 2).
STOP_RUN = frozenset({ENDPOINT_REJECTED})
