"""Conversation handling for conditional pre-training, following the release's data rules.

- A multi-turn sample becomes one training example per turn: the conversation prefix up to and
  including that turn's answer (`expand_turns`).
- `<video>` goes at the start of the first user turn (`"<video>\\n" + question`).
- The prompt is the Qwen chat format; the loss covers only the last answer (its text, `<|im_end|>`
  and the newline after it), every earlier token is masked with IGNORE_INDEX.
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
    """Copy of the turns with exactly one `<video>`, at the start of the first user turn.

    `<image>` is treated as `<video>` (release); placeholders in later turns are dropped so a
    sample always has one splice point.
    """
    out = []
    for i, turn in enumerate(conversations):
        value = turn["value"].replace(IMAGE_TOKEN, VIDEO_TOKEN)
        value = value.replace(VIDEO_TOKEN, "").strip()
        if i == 0:
            value = f"{VIDEO_TOKEN}\n{value}"
        out.append({"from": turn["from"], "value": value})
    return out


def chat_pieces(conversations: list[dict], system_prompt: str) -> tuple[str, str]:
    """(prompt, target) strings in the Qwen chat format.

    prompt = system + earlier turns + last question + "<|im_start|>assistant\\n";
    target = last answer + "<|im_end|>\\n" (the supervised part).
    """
    text = f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
    for turn in conversations[:-1]:
        role = "user" if turn["from"] == "human" else "assistant"
        text += f"<|im_start|>{role}\n{turn['value']}<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    return text, f"{conversations[-1]['value']}<|im_end|>\n"


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def tokenize_example(conversations: list[dict], tokenizer, system_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) for one example whose last turn is the supervised answer.

    The `<video>` placeholder becomes VIDEO_TOKEN_INDEX (text around it is tokenized separately, as
    the release does); labels are IGNORE_INDEX except on the target.
    """
    validate_turns(conversations)
    prompt, target = chat_pieces(place_video_token(conversations), system_prompt)
    before, after = prompt.split(VIDEO_TOKEN, 1)
    prompt_ids = _encode(tokenizer, before) + [VIDEO_TOKEN_INDEX] + _encode(tokenizer, after)
    target_ids = _encode(tokenizer, target)
    input_ids = torch.tensor(prompt_ids + target_ids, dtype=torch.long)
    labels = torch.tensor([IGNORE_INDEX] * len(prompt_ids) + target_ids, dtype=torch.long)
    return input_ids, labels
