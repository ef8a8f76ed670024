"""Caption and instruct stages against the stub: pairs as LLaVA samples, JSON repair or rejection with a
reason for every expected pair, invalid replies retried and never cached, the paper's chain of thought
(frames + caption -> N instruction-followed descriptions), and a resumed run that repeats no request."""
from __future__ import annotations

import asyncio
import json

import pytest

from schemas import caption_reasons as reasons
from schemas.caption import CaptionConfig, EndpointConfig, InstructConfig
from schemas.records import VideoRecord
from stages import caption, instruct
from stages.llm import LLMClient, ResponseCache
from tests.stub_openai import VLM_CAPTION, make_result, pairs_responder

CAPTIONS = ["A man in a blue coat walks a brown dog through a green park.",
            "A red car drives along a coastal road at sunset.",
            "A chef chops onions and carrots on a wooden board in a kitchen."]


def config(stub, **kw) -> InstructConfig:
    ep = EndpointConfig(base_url=stub.base_url, model="stub-llm", timeout_s=1.0, backoff_base_s=0.01,
                        backoff_max_s=0.05, max_retries=kw.pop("max_retries", 4))
    return InstructConfig(endpoint=ep, **kw)


def run_instruct(stub, cfg, results, cache=None, keep=True):
    client = LLMClient(cfg.endpoint, cache)

    async def go():
        try:
            return [await instruct.ainstruct(r, cfg, client, keep) for r in results]
        finally:
            await client.aclose()

    return asyncio.run(go()), client


def run_caption(result, cfg, client):
    async def go():
        try:
            return await caption.acaption(result, cfg, client)
        finally:
            if client is not None:
                await client.aclose()

    return asyncio.run(go())


def llm_ids(results):
    return sorted(p.sample_id for r in results for s in r.samples for p in s.pairs if p.source == "llm")


def failure_ids(results, stage="instruct"):
    return sorted(f.item_id for r in results for f in r.failures if f.stage == stage)


def expected_ids(results, cfg):
    return sorted(f"{s.clip.id}-{cfg.prompt_version}-q{i}" for r in results for s in r.samples
                  if s.clip.caption for i in range(cfg.pairs_per_clip))


def test_pairs_become_llava_samples(stub):
    cfg = config(stub, pairs_per_clip=4)
    [result], client = run_instruct(stub, cfg, [make_result("vid-a", CAPTIONS[:2])])
    assert stub.total == 2  # one request per clip
    sample = result.samples[0]
    llm = [p for p in sample.pairs if p.source == "llm"]
    assert [p.kind for p in llm] == ["open_question", "focused_description", "temporal", "attribute"]
    assert all(p.prompt_version == "instruct-v1" and p.model == "stub-llm" for p in llm)
    assert llm[0].sample_id == f"{sample.clip.id}-instruct-v1-q0"
    by_id = {s.id: s for s in sample.samples}
    conv = by_id[llm[0].sample_id].llava_conversations()
    assert conv[0] == {"from": "human", "value": f"<video>\n{llm[0].instruction}"}
    assert conv[1] == {"from": "gpt", "value": llm[0].answer}
    assert any(p.source == "manifest" and p.kind == "caption" for p in sample.pairs)  # source caption kept
    assert client.usage.succeeded == 2 and client.usage.completion_tokens > 0


def test_prompt_carries_caption_title_duration_and_schema(stub):
    cfg = config(stub, kinds=["counting", "multiple_choice"], pairs_per_clip=2)
    result = make_result("data__cooking-show", CAPTIONS[2:])
    result.video = VideoRecord(id="data__cooking-show", source="/x/data__cooking-show.mp4",
                               relpath="data__cooking-show.mp4", metadata={"title": "Cooking  show"})
    untitled = make_result("data__bikes", CAPTIONS[:1])
    run_instruct(stub, cfg, [result, untitled])
    prompt = stub.bodies[0]["messages"][-1]["content"]
    assert CAPTIONS[2] in prompt and "Title: Cooking show. Duration: 2.0 s." in prompt  # from metadata
    assert "Title: unknown." in stub.bodies[1]["messages"][-1]["content"]  # never the file name
    assert prompt.rstrip().endswith("Kinds: counting, multiple_choice")
    schema = stub.bodies[0]["response_format"]["json_schema"]["schema"]  # built from the pydantic models
    assert schema["properties"]["pairs"]["minItems"] == 2 == schema["properties"]["pairs"]["maxItems"]
    [item] = schema["$defs"].values()
    assert item["properties"]["kind"]["enum"] == ["counting", "multiple_choice"]
    assert item["additionalProperties"] is False and set(item["required"]) == {"kind", "instruction", "answer"}


def test_llama_cpp_json_mode_and_one_request_per_pair(stub):
    cfg = config(stub, pairs_per_clip=3, pairs_per_request=1)
    cfg = cfg.model_copy(update={"endpoint": cfg.endpoint.model_copy(update={"json_mode": "json_object_schema"})})
    [result], _ = run_instruct(stub, cfg, [make_result("v", CAPTIONS[:1])])
    assert stub.total == 3
    assert stub.bodies[0]["response_format"]["type"] == "json_object"  # sent through extra_body
    assert "schema" in stub.bodies[0]["response_format"]
    assert llm_ids([result]) == expected_ids([result], cfg)


def test_chain_of_thought_sends_frames_and_caption_for_n_descriptions(stub):
    cfg = config(stub, input="frames_and_caption", kinds=["instruction_followed_description"], pairs_per_clip=3,
                 images_per_request=3, image_size_px=32, prompt_version="hicom248k-cot-v1")
    [result], _ = run_instruct(stub, cfg, [make_result("v", CAPTIONS[:1], frames_per_clip=6)])
    assert stub.total == 1
    parts = stub.bodies[0]["messages"][-1]["content"]
    assert len([p for p in parts if p["type"] == "image_url"]) == 3
    text = parts[0]["text"]
    assert CAPTIONS[0] in text and "Write 3 instruction-answer pairs" in text and "3 frames" in text
    llm = [p for p in result.samples[0].pairs if p.source == "llm"]
    assert len(llm) == 3 and {p.kind for p in llm} == {"instruction_followed_description"}
    assert all(p.prompt_version == "hicom248k-cot-v1" for p in llm)
    assert result.samples[0].clip.caption == CAPTIONS[0]  # the caption stays with the clip


def test_keep_source_caption_pair_off(stub):
    [result], _ = run_instruct(stub, config(stub), [make_result("v", CAPTIONS[:1])], keep=False)
    assert all(p.source == "llm" for p in result.samples[0].pairs)
    assert all("-caption" not in s.id for s in result.samples[0].samples)


@pytest.mark.parametrize("text, n, problem", [
    ('{"pairs": [{"kind": "temporal", "instruction": "What then?", "answer": "Then he leaves."}]}', 1, None),
    ('Sure!\n```json\n{"pairs": [{"instruction": "Q?", "answer": "A."},]}\n```\nHope it helps.', 1, None),
    ('Here you go: {"pairs": [{"instruction": "Q?", "answer": "A."}]} done', 1, None),
    ('{"pairs": [{"instruction": "Q1?", "answer": "A1."}, {"instruction": "Q2?", "ans', 1, reasons.LLM_MALFORMED_JSON),
    ("I cannot do that.", 0, reasons.LLM_MALFORMED_JSON),
    ('{"questions": []}', 0, reasons.LLM_SCHEMA_INVALID),
])
def test_parse_reply_repairs_or_names_the_problem(text, n, problem):
    items, got = instruct.parse_reply(text)
    assert len(items) == n and got == problem


def test_replies_that_stay_invalid_are_failures_with_reasons(stub):
    def responder(body):
        prompt = body["messages"][-1]["content"]
        if "red car" in prompt.split("Description:")[-1]:
            return json.dumps({"pairs": [{"kind": "temporal", "instruction": "What happens?"},  # no answer
                                         {"kind": "attribute", "instruction": "What colour is the car?",
                                          "answer": "The car is red."}]})
        return pairs_responder(body)

    stub.responder = responder
    cfg = config(stub, pairs_per_clip=4, max_retries=2)
    results = [make_result("v1", [CAPTIONS[0] + " [[stub:malformed:9]]", CAPTIONS[1]]),
               make_result("v2", [CAPTIONS[2], None])]
    out, client = run_instruct(stub, cfg, results)
    reasons_by_id = {f.item_id: f.reason for r in out for f in r.failures if f.stage == "instruct"}
    clip0, clip1 = out[0].samples[0].clip.id, out[0].samples[1].clip.id
    assert {reasons_by_id[f"{clip0}-instruct-v1-q{i}"] for i in range(4)} == {reasons.LLM_MALFORMED_JSON}
    assert reasons_by_id[f"{clip1}-instruct-v1-q0"] == reasons.LLM_SCHEMA_INVALID
    assert f"{clip1}-instruct-v1-q1" not in reasons_by_id  # the valid item of the last reply is kept
    assert {reasons_by_id[f"{clip1}-instruct-v1-q{i}"] for i in (2, 3)} == {reasons.LLM_MISSING_PAIR}
    assert stub.total == 3 + 3 + 1 and client.usage.errors["invalid_reply"] == 6  # bounded retries
    # nothing lost: every expected pair is either kept or failed with a reason
    assert sorted(llm_ids(out) + failure_ids(out)) == expected_ids(out, cfg)


def test_malformed_replies_are_retried_never_cached_and_asked_again(stub, tmp_path):
    stub.mode, stub.every = "malformed", 3  # every 3rd reply is malformed
    cfg = config(stub, pairs_per_clip=3)
    results = [make_result(f"v{i}", [f"{CAPTIONS[i % 3]} Take {i}."], frame_seed=i) for i in range(10)]
    out, client = run_instruct(stub, cfg, results, ResponseCache(tmp_path))
    assert len(llm_ids(out)) == 30 and failure_ids(out) == []  # 0 of 30 lost (was 12)
    assert client.usage.errors["invalid_reply"] >= 3 and len(ResponseCache(tmp_path)) == 10

    stub.mode, stub.every = "malformed", None  # an input that stays malformed: a failure, not cached
    bad = [make_result("bad", ["A goat climbs a rocky hill under a grey sky."])]
    out, _ = run_instruct(stub, config(stub, pairs_per_clip=3, max_retries=1), bad, ResponseCache(tmp_path))
    assert {f.reason for f in out[0].failures} == {reasons.LLM_MALFORMED_JSON}
    assert len(ResponseCache(tmp_path)) == 10
    stub.mode, before = "ok", stub.total
    again, client = run_instruct(stub, config(stub, pairs_per_clip=3, max_retries=1),
                                 [make_result("bad", ["A goat climbs a rocky hill under a grey sky."])],
                                 ResponseCache(tmp_path))
    assert stub.total == before + 1 and client.usage.cache_hits == 0  # asked again on the next run
    assert len(llm_ids(again)) == 3 and len(ResponseCache(tmp_path)) == 11


def test_failed_requests_are_failures_not_exceptions(stub):
    stub.mode = "500"
    cfg = config(stub, pairs_per_clip=2, max_retries=1)
    out, client = run_instruct(stub, cfg, [make_result("v", CAPTIONS[:2])])
    assert llm_ids(out) == [] and failure_ids(out) == expected_ids(out, cfg)
    assert {f.reason for f in out[0].failures} == {reasons.LLM_UNAVAILABLE}  # retryable: a rerun tries again
    assert stub.total == 4 and client.usage.failed == 2  # bounded: 2 clips x (1 + 1 retry)
    assert "HTTP 500" in client.usage.last_error and stub.base_url in client.usage.last_error


def test_refused_requests_are_not_retried_later(stub):
    stub.mode = "400"
    cfg = config(stub, pairs_per_clip=1, max_retries=3)
    out, _ = run_instruct(stub, cfg, [make_result("v", CAPTIONS[:1])])
    assert {f.reason for f in out[0].failures} == {reasons.LLM_REQUEST_FAILED}
    assert reasons.LLM_REQUEST_FAILED not in reasons.RETRY_LATER
    assert stub.total == 1  # a 4xx is final: no retry


@pytest.mark.parametrize("status", ["401", "403", "404"])
def test_rejected_endpoint_stops_the_client(stub, status):
    stub.mode = status
    cfg = config(stub, pairs_per_clip=2)
    cfg = cfg.model_copy(update={"endpoint": cfg.endpoint.model_copy(update={"max_concurrency": 1})})
    out, client = run_instruct(stub, cfg, [make_result("v", CAPTIONS)])
    assert {f.reason for f in out[0].failures} == {reasons.ENDPOINT_REJECTED}
    assert reasons.ENDPOINT_REJECTED in reasons.STOP_RUN
    assert stub.total == 1 and client.usage.errors == {f"http_{status}": 1}  # the rest never sent
    assert f"HTTP {status}" in out[0].failures[0].detail and stub.base_url in out[0].failures[0].detail


def test_mixed_failures_then_resume_repeats_no_request(stub, tmp_path):
    stub.retry_after, stub.hang_s = 0.05, 2.0
    marks = ["[[stub:429:2]]", "[[stub:500:3]]", "[[stub:hang:1]]", "[[stub:malformed:1]]", "[[stub:bad_body:2]]", ""]
    results = [make_result(f"v{i}", [f"{CAPTIONS[i % 3]} {mark}"], frame_seed=i) for i, mark in enumerate(marks)]
    cfg = config(stub, pairs_per_clip=3)
    first, _ = run_instruct(stub, cfg, results, ResponseCache(tmp_path))
    assert failure_ids(first) == [] and len(llm_ids(first)) == 6 * 3
    sent = stub.total
    assert sent == 6 + 2 + 3 + 1 + 1 + 2  # one per input plus its retries (the malformed reply included)
    fresh = [make_result(f"v{i}", [f"{CAPTIONS[i % 3]} {mark}"], frame_seed=i) for i, mark in enumerate(marks)]
    again, client = run_instruct(stub, cfg, fresh, ResponseCache(tmp_path))
    assert stub.total == sent and client.usage.requests == 0 and client.usage.cache_hits == 6
    assert llm_ids(again) == llm_ids(first) and failure_ids(again) == failure_ids(first)


def test_rebuild_clips_make_no_calls(stub):
    from schemas.records import AnnotationSample
    from stages.pairs import pairs_of_sample

    result = make_result("v", [CAPTIONS[0]])
    released = AnnotationSample.model_validate({"id": "rel-1", "conversations": [
        {"from": "human", "value": "<video>\nWhat is the man doing?"}, {"from": "gpt", "value": "Walking a dog."}]})
    s = result.samples[0]
    result.samples[0] = s.model_copy(update={"samples": [released], "pairs": pairs_of_sample(released)})
    out, _ = run_instruct(stub, config(stub), [result])
    assert stub.total == 0 and [p.source for p in out[0].samples[0].pairs] == ["annotation"]


def test_source_caption_mode_reports_missing_captions(stub):
    result = run_caption(make_result("v", [CAPTIONS[0], None]), CaptionConfig(), None)
    assert [f.reason for f in result.failures] == [reasons.NO_CAPTION] and stub.total == 0


def vlm(stub, **kw) -> EndpointConfig:
    return EndpointConfig(**{"base_url": stub.base_url, "model": "stub-vlm", "timeout_s": 1.0,
                             "backoff_base_s": 0.01, **kw})


def test_vlm_caption_sends_frames_and_adds_a_caption_pair(stub):
    ep = vlm(stub)
    cfg = CaptionConfig(mode="auto", endpoint=ep, images_per_request=3, image_size_px=32)
    result = run_caption(make_result("v", [CAPTIONS[0], None]), cfg, LLMClient(ep))
    assert stub.total == 1  # only the clip without a source caption
    parts = stub.bodies[0]["messages"][0]["content"]
    images = [p for p in parts if p["type"] == "image_url"]
    assert len(images) == 3 and images[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert "caption" in stub.bodies[0]["response_format"]["json_schema"]["schema"]["properties"]
    clip = result.samples[1]
    assert clip.clip.caption == f"{VLM_CAPTION} (3 frames)"
    [pair] = [p for p in clip.pairs if p.source == "llm"]
    assert pair.kind == "caption" and pair.model == "stub-vlm" and pair.prompt_version == "caption-v1"
    assert pair.sample_id in {s.id for s in clip.samples}


def test_malformed_caption_is_never_the_clip_caption_nor_cached(stub, tmp_path):
    stub.mode = "malformed"  # 200 with prose that is not a caption object
    ep = vlm(stub, max_retries=1)
    cfg = CaptionConfig(mode="vlm", endpoint=ep)
    result = run_caption(make_result("v", [None]), cfg, LLMClient(ep, ResponseCache(tmp_path)))
    assert [f.reason for f in result.failures] == [reasons.CAPTION_EMPTY] and stub.total == 2
    assert result.samples[0].clip.caption is None and len(ResponseCache(tmp_path)) == 0
    stub.mode = "ok"
    result = run_caption(make_result("v", [None]), cfg, LLMClient(ep, ResponseCache(tmp_path)))
    assert result.failures == [] and result.samples[0].clip.caption.startswith(VLM_CAPTION) and stub.total == 3


def test_vlm_failure_is_a_reasoned_failure(stub):
    stub.mode = "500"
    ep = vlm(stub, max_retries=0)
    result = run_caption(make_result("v", [None]), CaptionConfig(mode="vlm", endpoint=ep), LLMClient(ep))
    assert [f.reason for f in result.failures] == [reasons.CAPTION_UNAVAILABLE]
    assert result.samples[0].clip.caption is None
