"""Conversation handling for conditional pre-training, following the release's data rules.

- A multi-turn sample becomes one training example per turn: the conversation prefix up to and
  including that turn's answer (`expand_turns`).
- `<video>` goes at the start of the first user turn (`"<video>\\n" + question`).
- The prompt is the LLM tokenizer's own chat template, called without a system message unless one is
  configured (the release does the same, so Qwen2.5 adds its default system prompt); the loss covers
  only the last answer (its text, `<|im_end|>` and the newline after it), every earlier token is masked.
- Whitespace: only the turn holding `<video>` is stripped, as in the release.
- The instruction for the text tower is the last user question with the release's cleaning rules
  (`extract_guide_text`).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN_INDEX = -201  # sentinel id in input_ids where the visual tokens are spliced in (release)

# Multiple-choice boilerplate the release cuts from the guide text (hicom/mm_utils.py).
OPTION_PROMPTS = (
    "Select one or more correct answers from following:\n",
    "Choose the corresponding category that captures this action from the offered options. Options:\n",
    "Pick the most suitable category that represents the interaction from the provided options. Options:\n",
    "Select the most accurate category from the available choices. Options:\n",
    "Identify the most accurate action category from the provided options. Options:\n",
    "Choose the appropriate action category from the listed choices. Options:\n",
    "Determine the action category that aligns best with these features from the selection provided. Options:\n",
    "Select the category that best characterizes this interaction from the given choices. Options:\n",
    "Pick the relevant category from the list of options. Options:\n",
    "Select the fitting category that describes their interaction from the available options. Options:\n",
    "Determine the best-matching action category from the choices given. Options:\n",
    "\nOptions:\nA. ",
)
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = (
    "Please provide your answer by stating the letter followed by the full option.",
    "Please respond with only the letter of the correct answer.",
)
QUESTION_PREFIX = "Question: "


def extract_guide_text(prompt: str, quirks: bool = True) -> str:
    """Instruction text for the text tower from a user turn (release `extract_guide_text` rules).

    Removes `<video>`/`<image>`, the short-answer boilerplate, multiple-choice options and a leading
    "Question: ". With `quirks`, the leading "Question: " is removed the release's way,
    `str.lstrip("Question: ")`, which strips any of those *characters* (so "Question: nothing" loses
    the "n" of "nothing" too); without, exactly the prefix is removed.
    """
    text = prompt.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "").strip()
    text = text.replace(SHORT_ANSWER, "")
    if any(s in text for s in LETTER_ANSWER):
        return text.split("\nA. ")[0]
    if text.startswith(QUESTION_PREFIX):
        text = text.lstrip(QUESTION_PREFIX) if quirks else text[len(QUESTION_PREFIX):]
        return text.split("\nOptions:\n(A)")[0]
    for option_prompt in OPTION_PROMPTS:
        if option_prompt in text:
            text = text.split(option_prompt)[0]
            break
    if "Options:\n(A)" in text:
        text = text.split("Options:\n(A)")[0].split(QUESTION_PREFIX)[-1]
    return text


def validate_turns(conversations: list[dict]) -> None:
    """Raise ValueError unless turns alternate human, gpt, human, gpt, ... (even, non-empty)."""
    if not conversations or len(conversations) % 2:
        raise ValueError(f"conversation needs human/gpt pairs, got {len(conversations)} turns")
    for i, turn in enumerate(conversations):
        want = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != want:
            raise ValueError(f"turn {i} is from {turn.get('from')!r}, expected {want!r}")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} has no text value")


def expand_turns(conversations: list[dict]) -> list[list[dict]]:
    """One conversation prefix per answer: [[q1, a1], [q1, a1, q2, a2], ...] (release expansion)."""
    validate_turns(conversations)
    return [list(conversations[: i + 1]) for i in range(1, len(conversations), 2)]


def place_video_token(conversations: list[dict]) -> list[dict]:
    """Copy of the turns with exactly one `<video>`, at the start of the first user turn (release rules).

    `<image>` is treated as `<video>`. Only a turn that holds the placeholder is stripped of surrounding
    whitespace (the release strips that turn and no other), so answers keep their own whitespace;
    placeholders in later turns are dropped so a sample always has one splice point.
    """
    out = []
    for i, turn in enumerate(conversations):
        value = turn["value"].replace(IMAGE_TOKEN, VIDEO_TOKEN)
        if i == 0:
            value = f"{VIDEO_TOKEN}\n{value.replace(VIDEO_TOKEN, '').strip()}"
        elif VIDEO_TOKEN in value:
            value = value.replace(VIDEO_TOKEN, "").strip()
        out.append({"from": turn["from"], "value": value})
    return out


def chat_messages(conversations: list[dict], system_prompt: str | None = None) -> list[dict]:
    """Chat-template messages for the turns; a system message only when `system_prompt` is given.

    Without one the tokenizer's own template decides (Qwen2.5-Instruct inserts its default system
    prompt), which is what the release does: it never passes a system message.
    """
    roles = {"human": "user", "gpt": "assistant"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in conversations]
    return ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + messages


def encode_multimodal(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with each `<video>` replaced by VIDEO_TOKEN_INDEX; the text between
    placeholders is tokenized piece by piece, as the release's `tokenizer_multimodal_token` does."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(VIDEO_TOKEN)):
        if i:
            ids.append(VIDEO_TOKEN_INDEX)
        if chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


def tokenize_example(conversations: list[dict], tokenizer,
                     system_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) for one example whose last turn is the supervised answer.

    The release's rule: the whole conversation is rendered with the tokenizer's chat template and
    tokenized at once; the first N tokens are masked, N being the token count of the prompt rendered
    up to the last question with the generation prompt. So the labels cover the last answer, its
    `<|im_end|>` and what the template puts after it; earlier answers are context only.
    """
    validate_turns(conversations)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the LLM tokenizer has no chat_template: use the LLM's own tokenizer (Qwen2.5-Instruct)")
    messages = chat_messages(place_video_token(conversations), system_prompt)
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    ids = encode_multimodal(tokenizer, full)
    masked = min(len(encode_multimodal(tokenizer, prompt)), len(ids))
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    labels[:masked] = IGNORE_INDEX
    return input_ids, labels
