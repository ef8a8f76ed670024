from schemas.config import InputConfig
from schemas.records import AnnotationSample, ClipRecord, ShardSample, Turn
from stages.pairs import attach_pairs, pairs_of_sample


def _clip(caption=None):
    return ClipRecord(id="v_0_1000", video_id="v", source="v.mp4", start_s=0, end_s=1, frame_times_s=[0],
                      frame_indices=[0], frames_in_clip=1, frame_size_px=4, caption=caption)


def test_multi_turn_sample_gives_one_pair_per_exchange():
    sample = AnnotationSample(id="s", conversations=[
        Turn(speaker="human", value="<video>\nWhat is it?"), Turn(speaker="gpt", value="A cat."),
        Turn(speaker="human", value="What colour?"), Turn(speaker="gpt", value="Black.")])
    pairs = pairs_of_sample(sample)
    assert [(p.instruction, p.answer, p.turn, p.sample_id) for p in pairs] == [
        ("What is it?", "A cat.", 0, "s"), ("What colour?", "Black.", 1, "s")]


def test_source_caption_becomes_a_caption_pair_and_llava_sample():
    out = attach_pairs(ShardSample(clip=_clip("A dog runs."), frames=[b"x"]), InputConfig())
    (pair,) = out.pairs
    assert (pair.kind, pair.source, pair.answer) == ("caption", "manifest", "A dog runs.")
    assert out.samples[0].llava_conversations()[0]["value"].startswith("<video>\n")
    assert attach_pairs(ShardSample(clip=_clip(), frames=[b"x"]), InputConfig()).pairs == []
