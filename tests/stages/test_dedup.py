"""Dataset-wide near-duplicate clips: the band index finds real re-encodes; partitioned Ray actors drop them
before any LLM request, also after a resume."""
import random
import subprocess

import pytest

from schemas.caption import FilterConfig
from schemas.records import ClipRecord, ShardSample, VideoResult
from stages import dedup, dedup_ray
from stages.shard import PartWriter
from stages.storage import Storage

T = FilterConfig().clip_hash_max_distance


def frames_of(path, tmp_path, tag: str, count: int = 4) -> list[bytes]:
    """`count` frames, 2 per second from the start, padded and resized to 384x384 JPEGs as the pipeline does."""
    out = tmp_path / tag
    out.mkdir()
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-vf",
                    "fps=2,pad=w='max(iw,ih)':h='max(iw,ih)':x='(ow-iw)/2':y='(oh-ih)/2',scale=384:384",
                    "-frames:v", str(count), "-q:v", "3", str(out / "f%02d.jpg")], check=True)
    return [p.read_bytes() for p in sorted(out.glob("f*.jpg"))]


@pytest.fixture(scope="module")
def reencoded(sample_dir, tmp_path_factory):
    """The first 2 s of a real video, and the same 2 s re-encoded at another CRF and size."""
    tmp = tmp_path_factory.mktemp("reencode")
    original, copy = tmp / "original.mp4", tmp / "copy.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(sample_dir / "bigbuckbunny.mp4"), "-t", "2",
                    "-c:v", "libx264", "-crf", "18", "-an", str(original)], check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(original), "-vf", "scale=320:-2",
                    "-c:v", "libx264", "-crf", "36", "-an", str(copy)], check=True)
    return frames_of(original, tmp, "a"), frames_of(copy, tmp, "b")


def old_band_hit(a: list[int], b: list[int]) -> bool:
    """The previous index: 4 16-bit bands of the middle frame's hash only."""
    ma, mb = a[len(a) // 2], b[len(b) // 2]
    return any((ma >> (16 * i)) & 0xFFFF == (mb >> (16 * i)) & 0xFFFF for i in range(4))


def test_a_real_reencode_is_found_by_the_band_index(reencoded):
    a, b = (dedup.clip_signature(frames, 4) for frames in reencoded)
    distance = dedup.signature_distance(a, b)
    assert 0 < distance <= T, f"the re-encode should be a near-duplicate, mean Hamming {distance}"
    index = dedup.SignatureIndex(T)
    index.add("original", a)
    assert index.match(b) == ("original", distance)


def test_band_index_never_misses_a_pair_within_the_threshold():
    rng = random.Random(7)
    old_misses = 0
    for _ in range(3000):
        a = [rng.getrandbits(64) for _ in range(4)]
        flips = [rng.randint(0, 12) for _ in range(4)]
        if sum(flips) / 4 > T:
            continue
        b = [h ^ sum(1 << bit for bit in rng.sample(range(64), n)) for h, n in zip(a, flips)]
        assert set(dedup.band_keys(a, T)) & set(dedup.band_keys(b, T)), (a, b)
        old_misses += not old_band_hit(a, b)
    assert old_misses > 0  # the middle-frame, 4-band index missed some of these pairs


def result_with(video_id: str, frames: list[bytes], start: int = 0) -> VideoResult:
    clip = ClipRecord(id=ClipRecord.make_id(video_id, start, start + 2), video_id=video_id, source=f"{video_id}.mp4",
                      start_s=start, end_s=start + 2, frame_times_s=[0.0], frame_indices=[0],
                      frames_in_clip=len(frames), frame_size_px=384)
    return VideoResult(video_id=video_id, source=f"{video_id}.mp4", samples=[ShardSample(clip=clip, frames=frames)])


def test_partitioned_actors_drop_dataset_duplicates_and_reload_on_resume(reencoded, sample_dir, tmp_path,
                                                                          ray_local):
    cfg = FilterConfig()
    original, copy = reencoded
    actors = dedup_ray.start_partitions(cfg, str(tmp_path), [], partitions=3)
    first = dedup_ray._clip_dedup([result_with("vb", original), result_with("va", copy)], cfg, actors)
    kept = [r for r in first if r.samples]
    dropped = [f for r in first for f in r.failures]
    assert len(kept) == 1 and len(dropped) == 1  # never both dropped
    assert dropped[0].stage == "dedup" and dropped[0].reason == "duplicate_clip"
    # resume: the committed clip is reloaded from its part's frame hashes; a new copy is dropped
    PartWriter(Storage.from_uri(tmp_path), signature_frames=cfg.clip_hash_frames).write("part-00aa", kept)
    resumed = dedup_ray.start_partitions(cfg, str(tmp_path), ["part-00aa"], partitions=2)
    other = frames_of(sample_dir / "bikes.mp4", tmp_path, "other")
    again = dedup_ray._clip_dedup([result_with("vz", copy), result_with("vy", other)], cfg, resumed)
    assert not again[0].samples and "in the dataset" in again[0].failures[0].detail
    assert again[1].samples and not again[1].failures  # another video's frames: kept


def test_duplicates_cost_no_llm_request(reencoded, sample_dir, stub, tmp_path, ray_local):
    """The build's captioning wiring: the dataset dedup stage runs before caption/instruct (issue 12, item 5)."""
    from pipeline import captioning as cap_pipeline
    from schemas.caption import CaptioningConfig
    from schemas.config import RunConfig
    from stages.ray_adapter import from_row, to_row

    original, copy = reencoded
    other = frames_of(sample_dir / "bikes.mp4", tmp_path, "other")
    cap = CaptioningConfig.model_validate({
        "instruct": {"endpoint": {"base_url": stub.base_url, "model": "stub-llm", "timeout_s": 5.0}},
        "actors": {"filter_actor_cpus": 0.25, "llm_actor_cpus": 0.25, "llm_actors": 1, "filter_actors": 1}})
    cfg = RunConfig(captioning=cap)

    def captioned(video_id, frames, caption="A large white rabbit stands in a green meadow under the trees."):
        result = result_with(video_id, frames)
        result.samples[0].clip.caption = caption
        return result

    def run(results, parts):
        with cap_pipeline.captioning_session(cfg, tmp_path, parts) as session:
            ds = ray_local.data.from_items([to_row(r) for r in results])
            for stage, options in session.stages:
                ds = ds.map_batches(stage, **options)
            return sorted((from_row(row) for row in ds.iter_rows()), key=lambda r: r.video_id)

    first = run([captioned("v1", original)], [])
    assert stub.total == 1 and first[0].samples
    PartWriter(Storage.from_uri(tmp_path), signature_frames=cap.filter.clip_hash_frames).write("part-0001", first)
    second = run([captioned("v2", copy), captioned("v3", other, "Two cyclists ride along a dirt path past tall trees.")], ["part-0001"])
    assert stub.total == 2  # one request for the new clip, none for the re-encoded duplicate
    assert not second[0].samples
    assert [(f.stage, f.reason) for f in second[0].failures] == [("dedup", "duplicate_clip")]
    assert second[1].samples
