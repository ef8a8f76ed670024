"""Guide text rules, per-turn expansion, prompt format and label masking."""

import pytest
import torch

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
    ids, labels = tokenize_example(CONV[:4], tok)
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


# --- release equivalence: the release's preprocessing rules, transcribed, against ours ----------------------
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
# Qwen2.5-Instruct-like: a default system prompt is inserted when the messages have none.
TEST_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>system\\nYou are Tiny-Qwen, made for tests. Be helpful.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}{%- if m['role'] != 'system' -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
WHITESPACE_CONVS = [
    [{"from": "human", "value": "<video>\nWhat is the dog doing?"}, {"from": "gpt", "value": "It runs."},
     {"from": "human", "value": "And the cat?  "}, {"from": "gpt", "value": "  It sleeps.\n"},
     {"from": "human", "value": "\nWhere?"}, {"from": "gpt", "value": "\n\nOn a sofa.  "}],
    [{"from": "human", "value": "  Describe the red car. <video>  "}, {"from": "gpt", "value": " A red car parks."}],
    [{"from": "human", "value": "What happens?\n"}, {"from": "gpt", "value": "\tA man waves.\n\n"},
     {"from": "human", "value": "Then?"}, {"from": "gpt", "value": "He leaves   "}],
    [{"from": "human", "value": "<image>\nWhat colour is the ball?"}, {"from": "gpt", "value": "Red.\n"}],
]


@pytest.fixture(scope="module")
def qwen_like_tokenizer():
    """A small BPE (byte level, Qwen2's split regex, merges learnt here) with a Qwen2-style chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [t["value"] for conv in WHITESPACE_CONVS + [CONV] for t in conv] * 20 + [
        "assistant\n\n", "user\n", "system\n", "  \n\n  "] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = TEST_TEMPLATE
    return fast


def release_tokenize(conversations: list[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """The release's path for one video sample, written out: guide-format expansion (`<video>` added to the
    first turn), `preprocess_multimodal` (strips only a turn holding `<video>`), `preprocess(process_guided)`
    (chat template without a system message, per-turn masking), `tokenizer_multimodal_token`."""
    import copy

    def mm_tokens(text):
        ids = []
        for i, chunk in enumerate(text.split("<video>")):
            ids += ([VIDEO_TOKEN_INDEX] if i else []) + tokenizer(chunk).input_ids
        return ids

    def render(messages, generation):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    conv = copy.deepcopy(conversations)
    if "<video>" not in conv[0]["value"]:
        conv[0]["value"] = (conv[0]["value"].replace("<image>", "<video>") if "<image>" in conv[0]["value"]
                            else "<video>\n" + conv[0]["value"])
    out = []
    for end in range(2, len(conv) + 1, 2):
        source = copy.deepcopy(conv[:end])
        for sentence in source:
            if "<video>" in sentence["value"]:
                sentence["value"] = ("<video>\n" + sentence["value"].replace("<video>", "").strip()).strip()
        roles = {"human": "user", "gpt": "assistant"}
        messages = [{"role": roles[s["from"]], "content": s["value"]} for s in source]
        ids = torch.tensor(mm_tokens(render(messages, False)))
        labels = ids.clone()
        cur, history = 0, []
        for idx in range(1, len(messages), 2):
            pair = messages[idx - 1: idx + 1]
            instruction_len = len(mm_tokens(render(history + pair[:1], True)))
            conversation_len = len(mm_tokens(render(history + pair, False)))
            labels[cur:instruction_len if idx == len(messages) - 1 else conversation_len] = IGNORE_INDEX
            cur = conversation_len
            history += pair
        out.append((ids.tolist(), labels.tolist()))
    return out


@pytest.mark.parametrize("conv", WHITESPACE_CONVS + [CONV], ids=["whitespace-3turn", "video-last", "no-video",
                                                                  "image", "plain-3turn"])
def test_tokens_and_labels_equal_the_release(conv, qwen_like_tokenizer):
    from model.collate import expand_clip_sample

    ours = [tokenize_example(ex["json"]["conversations"], qwen_like_tokenizer)
            for ex in expand_clip_sample({"__key__": "c", "frames": [], "json": {"conversations": conv}})]
    release = release_tokenize(conv, qwen_like_tokenizer)
    assert [(i.tolist(), lab.tolist()) for i, lab in ours] == release
    text = qwen_like_tokenizer.decode([i for i in ours[0][0].tolist() if i >= 0])
    assert text.startswith("<|im_start|>system\nYou are Tiny-Qwen, made for tests.")  # the template's default
    last_answer = conv[-1]["value"]
    supervised = [t for t in ours[-1][1].tolist() if t != IGNORE_INDEX]
    target = last_answer + "<|im_end|>\n"
    # whitespace kept; an answer opening with newlines shares a token with the prompt's "assistant\n" and the
    # release masks that token with the prompt (its prompt length counts it), so the label starts after it
    assert qwen_like_tokenizer.decode(supervised) == (target if not target.startswith("\n") else target[1:])


def test_explicit_system_prompt_replaces_the_default(qwen_like_tokenizer):
    ids, _ = tokenize_example(CONV[:2], qwen_like_tokenizer, system_prompt="Describe videos.")
    text = qwen_like_tokenizer.decode([i for i in ids.tolist() if i >= 0])
    assert text.startswith("<|im_start|>system\nDescribe videos.<|im_end|>\n<|im_start|>user\n")
