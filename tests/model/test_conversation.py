"""Guide text rules, per-turn expansion, prompt format and label masking."""

import pytest

from model.conversation import (IGNORE_INDEX, VIDEO_TOKEN_INDEX, expand_turns, extract_guide_text,
                                place_video_token, tokenize_example)
from model.presets import tiny_llm_tokenizer


@pytest.mark.parametrize("prompt,expected", [
    ("<video>\nWhat is the man holding?", "What is the man holding?"),
    ("What is the man holding?\n<video>", "What is the man holding?"),
    ("<image>\nWhat color is the car?\nAnswer the question using a single word or phrase.", "What color is the car?\n"),
    ("<video>\nQuestion: What is the person doing?\nOptions:\n(A) running\n(B) sitting", "What is the person doing?"),
    ("<video>\nWhat happens first?\nA. a dog\nB. a cat\nPlease respond with only the letter of the correct answer.",
     "What happens first?"),
    ("<video>\nWhich action is it? Select the most accurate category from the available choices. Options:\n(A) run",
     "Which action is it? "),
    ("<video>\nWatch closely. Question: Who enters?\nOptions:\n(A) a man\n(B) a woman", "Who enters?\n"),
    ("<video>\nHow many people?\nOptions:\nA. one\nB. two", "How many people?"),
])
def test_guide_text_rules(prompt, expected):
    assert extract_guide_text(prompt) == expected


def test_question_prefix_quirk():
    # the release uses str.lstrip("Question: "), which also eats leading letters of the question
    assert extract_guide_text("Question: nothing moves?", quirks=True) == "hing moves?"
    assert extract_guide_text("Question: nothing moves?", quirks=False) == "nothing moves?"


CONV = [
    {"from": "human", "value": "<video>\nWhat is the dog doing?"}, {"from": "gpt", "value": "It runs."},
    {"from": "human", "value": "And the cat?"}, {"from": "gpt", "value": "It sleeps."},
    {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "On a sofa."},
]


def test_expand_turns_one_example_per_answer():
    prefixes = expand_turns(CONV)
    assert [len(p) for p in prefixes] == [2, 4, 6]
    assert prefixes[1][-1]["value"] == "It sleeps."
    for bad in ([], CONV[:3], [CONV[1], CONV[0]], [CONV[0], CONV[2]]):
        with pytest.raises(ValueError):
            expand_turns(bad)


def test_video_token_goes_to_start_of_first_turn():
    turns = place_video_token([{"from": "human", "value": "Describe <image> this."}, {"from": "gpt", "value": "x"},
                               {"from": "human", "value": "<video> more"}, {"from": "gpt", "value": "y"}])
    assert turns[0]["value"] == "<video>\nDescribe  this."
    assert turns[2]["value"] == "more"
    assert place_video_token(CONV[:2])[0]["value"] == "<video>\nWhat is the dog doing?"


def test_labels_cover_only_the_last_answer():
    tok = tiny_llm_tokenizer()
    ids, labels = tokenize_example(CONV[:4], tok, "You are a helpful assistant.")
    assert ids.shape == labels.shape
    assert (ids == VIDEO_TOKEN_INDEX).sum() == 1
    supervised = labels[labels != IGNORE_INDEX].tolist()
    assert tok.decode(supervised) == "It sleeps.<|im_end|>\n"
    # supervised tokens are the tail of the sequence and equal the inputs there
    n = len(supervised)
    assert (labels[:-n] == IGNORE_INDEX).all() and labels[-n:].tolist() == ids[-n:].tolist()
    text = tok.decode([i for i in ids.tolist() if i >= 0])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\n"
                    "What is the dog doing?<|im_end|>\n<|im_start|>assistant\nIt runs.<|im_end|>\n"
                    "<|im_start|>user\nAnd the cat?<|im_end|>\n<|im_start|>assistant\nIt sleeps.<|im_end|>\n")
    start = ids.tolist().index(VIDEO_TOKEN_INDEX)
    assert tok.decode(ids[:start].tolist()) == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
