"""`hicom build configs/hicom248k.yaml` end to end on real videos against the stub VLM on 127.0.0.1, with the
tiny random SigLIP: clip lengths, keyframe and category columns, failure rows with reasons, the recipe section
of `hicom stats` and `--compare`."""
import json
import re
import shutil

import pytest

from conftest import REPO, make_scene_video
from pipeline.cli import main
from pipeline.stats import connect
from tests.stub_openai import StubOpenAI, image_count, last_user_text, requested_schema

CAPTION = ("A man in a red jacket walks a brown dog past a white car on a city street, while a woman in a "
           "green coat waits at a bus stop.")
SUBJECTS = {"man": "The man wears a red jacket and walks a brown dog along the city street.",
            "dog": "The brown dog walks on a lead beside the man in the red jacket on the street.",
            "woman": "The woman wears a green coat and waits at the bus stop on the city street."}


INSTRUCT_IMAGES: list[int] = []  # images per instruct request: step 2 must see the frames too


def vlm(body: dict) -> str:
    """Captions for caption requests; for the chain-of-thought instruct requests (frames + caption), N distinct
    grounded descriptions of the kind the request's JSON schema allows."""
    text = last_user_text(body)
    asked = re.search(r"Write (\d+) instruction-answer pairs", text)
    if not asked:  # step 1: the detailed caption, in the form the request's schema asks for
        return json.dumps({"caption": CAPTION}) if "caption" in str(requested_schema(body)) else CAPTION
    INSTRUCT_IMAGES.append(image_count(body))
    pairs = [{"kind": "instruction_followed_description", "instruction": f"Describe the {subject} in the video in "
              "detail.", "answer": answer} for subject, answer in list(SUBJECTS.items())[:int(asked.group(1))]]
    return json.dumps({"pairs": pairs})


@pytest.fixture(scope="module")
def videos(tmp_path_factory, sample_dir):
    folder = tmp_path_factory.mktemp("recipe_videos")
    make_scene_video(folder / "long_a.mp4", [("testsrc2", 12), ("mandelbrot", 9), ("smptebars", 3), ("rgbtestsrc", 14)],
                     size="160x120")
    make_scene_video(folder / "long_b.mp4", [("testsrc", 20), ("cellauto", 10), ("life", 6)], size="160x120")
    for name in ("bigbuckbunny.mp4", "bikes.mp4"):
        shutil.copy(sample_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def run(videos, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("recipe_run") / "run"
    with StubOpenAI(vlm) as stub:
        sets = [f"captioning.caption.endpoint.base_url={stub.base_url}",
                f"captioning.instruct.endpoint.base_url={stub.base_url}", "embedder.random_init=true",
                "recipe.categories.per_category=0", "recipe.categories.random_others=3",
                "captioning.actors.filter_actor_cpus=0.5", "ray.num_cpus=2"]
        code = main(["build", str(REPO / "configs" / "hicom248k.yaml"), "--input", str(videos), "--out", str(out),
                     "--no-progress", *[a for s in sets for a in ("--set", s)]])
    assert code == 0
    return out


@pytest.mark.slow
def test_recipe_build_keeps_5_to_120_s_clips_with_keyframe_and_category_columns(run):
    con = connect(run)
    lengths = [r[0] for r in con.execute("SELECT duration_s FROM clips").fetchall()]
    assert lengths and all(5.0 <= d <= 120.0 for d in lengths)
    assert con.execute("SELECT count(*) FROM clips WHERE keyframes_in_clip IS NULL OR keyframes_in_clip < 1"
                       ).fetchone()[0] == 0
    ok = con.execute("SELECT category, category_score, keyframe_times_s FROM videos WHERE status = 'ok'").fetchall()
    assert ok and all(c and s is not None and k for c, s, k in ok)
    kinds = con.execute("SELECT DISTINCT kind FROM pairs").fetchall()
    assert kinds == [("instruction_followed_description",)]  # HICom-248K's one data type, no caption pair
    per_clip = con.execute("SELECT c.clip_id, count(p.clip_id) FROM clips c LEFT JOIN pairs p USING (clip_id) "
                           "GROUP BY 1").fetchall()
    assert per_clip and all(n == 3 for _, n in per_clip), per_clip  # the paper's 3 pairs per clip
    assert INSTRUCT_IMAGES and all(n == 8 for n in INSTRUCT_IMAGES)  # step 2 saw 8 frames with the caption


@pytest.mark.slow
def test_every_input_and_drop_is_recorded_with_a_reason(run, videos):
    con = connect(run)
    assert con.execute("SELECT count(*) FROM videos").fetchone()[0] == len(list(videos.glob("*.mp4")))
    reasons = {r[0] for r in con.execute("SELECT DISTINCT reason FROM failures").fetchall()}
    assert "too_short" in reasons and "category_quota_full" in reasons
    assert con.execute("SELECT count(*) FROM failures WHERE reason IS NULL OR reason = ''").fetchone()[0] == 0
    quota = con.execute("SELECT count(*) FROM videos v JOIN failures f USING (video_id) "
                        "WHERE f.reason = 'category_quota_full' AND v.category IS NOT NULL").fetchone()[0]
    assert quota == 1  # 4 videos, none by similarity + 3 random: exactly one rejected, with its category


@pytest.mark.slow
def test_stats_recipe_section_and_compare(run, tmp_path, capsys):
    llava = tmp_path / "other.json"
    llava.write_text(json.dumps([{"id": str(i), "video": f"c{i // 3}.mp4", "conversations": [
        {"from": "human", "value": "<video>\nDescribe the man in detail."},
        {"from": "gpt", "value": "The man wears a red jacket."}]} for i in range(6)]))
    assert main(["stats", str(run), "--compare", str(llava)]) == 0
    out = capsys.readouterr().out
    assert "== Recipe: run vs HICom-248K ==" in out and "other.json" in out and "25.67" in out
    row = next(line for line in out.splitlines() if line.startswith("pairs per clip"))
    assert row.split()[-2:] == ["3.00", "2.98"]  # the file's 6 pairs on 2 clips, the paper's 739K / 248K
    assert "== Recipe: dropped per filter ==" in out and "too_short" in out
