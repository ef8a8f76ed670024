"""Caption and instruct stages against the stub: pairs as LLaVA samples, JSON repair or rejection with a
reason for every expected pair, and a resumed run that repeats no request."""
from __future__ import annotations

import json

import pytest

from schemas import caption_reasons as reasons
from schemas.caption import CaptionConfig, EndpointConfig, InstructConfig
from stages import caption, instruct
from stages.llm_client import LLMClient, ResponseCache, SyncRunner
from tests.stub_openai import make_result, pairs_responder

CAPTIONS = ["A man in a blue coat walks a brown dog through a green park.",
            "A red car drives along a coastal road at sunset.",
            "A chef chops onions and carrots on a wooden board in a kitchen."]


@pytest.fixture()
def runner():
    r = SyncRunner()
    yield r
    r.close()


def config(stub, **kw) -> InstructConfig:
    ep = EndpointConfig(base_url=stub.base_url, model="stub-llm", timeout_s=1.0, backoff_base_s=0.01,
                        backoff_max_s=0.05, max_retries=kw.pop("max_retries", 4))
    return InstructConfig(endpoint=ep, **kw)


def run_instruct(stub, runner, cfg, results, cache=None, keep=True):
    client = LLMClient(cfg.endpoint, cache)
    out = [instruct.apply(r, cfg, client, runner, keep) for r in results]
    runner.run(client.aclose())
    return out, client


def llm_ids(results):
    return sorted(p.sample_id for r in results for s in r.samples for p in s.pairs if p.source == "llm")


def failure_ids(results, stage="instruct"):
    return sorted(f.item_id for r in results for f in r.failures if f.stage == stage)


def expected_ids(results, cfg):
    return sorted(f"{s.clip.id}-{cfg.prompt_version}-q{i}" for r in results for s in r.samples
                  if s.clip.caption for i in range(cfg.pairs_per_clip))


def test_pairs_become_llava_samples(stub, runner):
    cfg = config(stub, pairs_per_clip=4)
    [result], client = run_instruct(stub, runner, cfg, [make_result("vid-a", CAPTIONS[:2])])
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


def test_prompt_carries_caption_title_duration_and_schema(stub, runner):
    cfg = config(stub, kinds=["counting", "multiple_choice"], pairs_per_clip=2)
    run_instruct(stub, runner, cfg, [make_result("cooking-show", CAPTIONS[2:])])
    body = stub.bodies[0]
    prompt = body["messages"][-1]["content"]
    assert CAPTIONS[2] in prompt and "Title: cooking-show. Duration: 2.0 s." in prompt
    assert prompt.rstrip().endswith("Kinds: counting, multiple_choice")
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["pairs"]["minItems"] == 2 == schema["properties"]["pairs"]["maxItems"]
    assert schema["properties"]["pairs"]["items"]["properties"]["kind"]["enum"] == ["counting", "multiple_choice"]


def test_llama_cpp_json_mode_and_one_request_per_pair(stub, runner):
    cfg = config(stub, pairs_per_clip=3, pairs_per_request=1)
    cfg = cfg.model_copy(update={"endpoint": cfg.endpoint.model_copy(update={"json_mode": "json_object_schema"})})
    [result], _ = run_instruct(stub, runner, cfg, [make_result("v", CAPTIONS[:1])])
    assert stub.total == 3
    assert stub.bodies[0]["response_format"]["type"] == "json_object"
    assert "schema" in stub.bodies[0]["response_format"]
    assert llm_ids([result]) == expected_ids([result], cfg)


def test_keep_source_caption_pair_off(stub, runner):
    [result], _ = run_instruct(stub, runner, config(stub), [make_result("v", CAPTIONS[:1])], keep=False)
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


def test_malformed_and_invalid_replies_are_rejected_with_reasons(stub, runner):
    def responder(body):
        prompt = body["messages"][-1]["content"]
        if "red car" in prompt.split("Description:")[-1]:
            return json.dumps({"pairs": [{"kind": "temporal", "instruction": "What happens?"},  # no answer
                                         {"kind": "attribute", "instruction": "What colour is the car?",
                                          "answer": "The car is red."}]})
        return pairs_responder(body)

    stub.responder = responder
    cfg = config(stub, pairs_per_clip=4)
    results = [make_result("v1", [CAPTIONS[0] + " [[stub:malformed:9]]", CAPTIONS[1]]),
               make_result("v2", [CAPTIONS[2], None])]
    out, _ = run_instruct(stub, runner, cfg, results)
    reasons_by_id = {f.item_id: f.reason for r in out for f in r.failures if f.stage == "instruct"}
    clip0, clip1 = out[0].samples[0].clip.id, out[0].samples[1].clip.id
    assert {reasons_by_id[f"{clip0}-instruct-v1-q{i}"] for i in range(4)} == {reasons.LLM_MALFORMED_JSON}
    assert reasons_by_id[f"{clip1}-instruct-v1-q0"] == reasons.LLM_SCHEMA_INVALID
    assert f"{clip1}-instruct-v1-q1" not in reasons_by_id
    assert {reasons_by_id[f"{clip1}-instruct-v1-q{i}"] for i in (2, 3)} == {reasons.LLM_MISSING_PAIR}
    # nothing lost: every expected pair is either kept or failed with a reason
    assert sorted(llm_ids(out) + failure_ids(out)) == expected_ids(out, cfg)


def test_failed_requests_are_failures_not_exceptions(stub, runner):
    stub.mode = "500"
    cfg = config(stub, pairs_per_clip=2, max_retries=1)
    out, client = run_instruct(stub, runner, cfg, [make_result("v", CAPTIONS[:2])])
    assert llm_ids(out) == [] and failure_ids(out) == expected_ids(out, cfg)
    assert {f.reason for f in out[0].failures} == {reasons.LLM_UNAVAILABLE}  # retryable: a rerun tries again
    assert stub.total == 4 and client.usage.failed == 2  # bounded: 2 clips x (1 + 1 retry)


def test_refused_requests_are_not_retried_later(stub, runner):
    stub.mode = "400"
    cfg = config(stub, pairs_per_clip=1, max_retries=3)
    out, _ = run_instruct(stub, runner, cfg, [make_result("v", CAPTIONS[:1])])
    assert {f.reason for f in out[0].failures} == {reasons.LLM_REQUEST_FAILED}
    assert reasons.LLM_REQUEST_FAILED not in reasons.RETRY_LATER
    assert stub.total == 1  # a 4xx is final: no retry


def test_mixed_failures_then_resume_repeats_no_request(stub, runner, tmp_path):
    stub.retry_after, stub.hang_s = 0.05, 2.0
    marks = ["[[stub:429:2]]", "[[stub:500:3]]", "[[stub:hang:1]]", "[[stub:malformed:1]]", "[[stub:bad_body:2]]", ""]
    results = [make_result(f"v{i}", [f"{CAPTIONS[i % 3]} {mark}"], frame_seed=i) for i, mark in enumerate(marks)]
    cfg = config(stub, pairs_per_clip=3)
    first, _ = run_instruct(stub, runner, cfg, results, ResponseCache(tmp_path))
    assert sorted(llm_ids(first) + failure_ids(first)) == expected_ids(first, cfg)
    assert {f.reason for r in first for f in r.failures} == {reasons.LLM_MALFORMED_JSON}  # 200s, not retried
    assert len(llm_ids(first)) == 5 * 3
    sent = stub.total
    assert sent == 6 + 2 + 3 + 1 + 2  # one per input plus its retries
    fresh = [make_result(f"v{i}", [f"{CAPTIONS[i % 3]} {mark}"], frame_seed=i) for i, mark in enumerate(marks)]
    again, client = run_instruct(stub, runner, cfg, fresh, ResponseCache(tmp_path))
    assert stub.total == sent and client.usage.requests == 0 and client.usage.cache_hits == 6
    assert llm_ids(again) == llm_ids(first) and failure_ids(again) == failure_ids(first)


def test_rebuild_clips_make_no_calls(stub, runner):
    from schemas.records import AnnotationSample
    from stages.pairs import pairs_of_sample

    result = make_result("v", [CAPTIONS[0]])
    released = AnnotationSample.model_validate({"id": "rel-1", "conversations": [
        {"from": "human", "value": "<video>\nWhat is the man doing?"}, {"from": "gpt", "value": "Walking a dog."}]})
    s = result.samples[0]
    result.samples[0] = s.model_copy(update={"samples": [released], "pairs": pairs_of_sample(released)})
    out, _ = run_instruct(stub, runner, config(stub), [result])
    assert stub.total == 0 and [p.source for p in out[0].samples[0].pairs] == ["annotation"]


def test_source_caption_mode_reports_missing_captions(stub, runner):
    result = caption.apply(make_result("v", [CAPTIONS[0], None]), CaptionConfig(), None, runner)
    assert [f.reason for f in result.failures] == [reasons.NO_CAPTION] and stub.total == 0


def test_vlm_caption_sends_frames_and_adds_a_caption_pair(stub, runner):
    stub.responder = lambda body: "A grey cat sleeps on a sofa while the light from a window slowly fades."
    ep = EndpointConfig(base_url=stub.base_url, model="stub-vlm", timeout_s=1.0, backoff_base_s=0.01)
    cfg = CaptionConfig(mode="auto", endpoint=ep, num_frames=3, image_size_px=32)
    client = LLMClient(ep)
    result = caption.apply(make_result("v", [CAPTIONS[0], None]), cfg, client, runner)
    runner.run(client.aclose())
    assert stub.total == 1  # only the clip without a source caption
    parts = stub.bodies[0]["messages"][0]["content"]
    images = [p for p in parts if p["type"] == "image_url"]
    assert len(images) == 3 and images[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    clip = result.samples[1]
    assert clip.clip.caption.startswith("A grey cat")
    [pair] = [p for p in clip.pairs if p.source == "llm"]
    assert pair.kind == "caption" and pair.model == "stub-vlm" and pair.prompt_version == "caption-v1"
    assert pair.sample_id in {s.id for s in clip.samples}


def test_vlm_failure_is_a_reasoned_failure(stub, runner):
    stub.mode = "500"
    ep = EndpointConfig(base_url=stub.base_url, model="stub-vlm", max_retries=0, backoff_base_s=0.01)
    client = LLMClient(ep)
    result = caption.apply(make_result("v", [None]), CaptionConfig(mode="vlm", endpoint=ep), client, runner)
    runner.run(client.aclose())
    assert [f.reason for f in result.failures] == [reasons.CAPTION_UNAVAILABLE]
    assert result.samples[0].clip.caption is None
