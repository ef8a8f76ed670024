"""Reason codes for failures. One code per distinct way an input can fail, so SQL can group by them."""

# ingest
PATH_ESCAPES_ROOT = "path_escapes_root"
ABSOLUTE_PATH = "absolute_path_outside_root"
MISSING_FILE = "missing_file"
NOT_A_FILE = "not_a_file"
UNREADABLE = "unreadable_file"
BAD_ANNOTATION = "bad_annotation"
BAD_NAME = "undecodable_file_name"
UNSUPPORTED_URL = "unsupported_url"
DUPLICATE_SOURCE = "duplicate_source"  # a second name (symlink) for a file already ingested under its own name
MALFORMED_ROW = "malformed_manifest_row"  # wrong column count, a line that is not JSON, an unreadable file
DUPLICATE_SPAN = "duplicate_span"  # a manifest row repeating a span (or a whole video) already listed
# probe
EMPTY_FILE = "empty_file"
FILE_TOO_LARGE = "file_too_large"
NOT_A_VIDEO = "not_a_video"
STILL_IMAGE = "still_image"
TRUNCATED = "truncated_or_corrupt_container"
FORBIDDEN_REFERENCE = "forbidden_reference"
NO_VIDEO_STREAM = "no_video_stream"
ZERO_DURATION = "zero_duration"
UNDECODABLE = "undecodable"
TOO_LONG = "duration_over_limit"
TOO_LARGE_FRAME = "resolution_over_limit"
PROBE_TIMEOUT = "probe_timeout"
# split
NO_CLIPS = "no_clips"
SPAN_OUT_OF_RANGE = "span_out_of_range"  # starts or ends past the end of the video
SPAN_NEGATIVE = "span_negative_start"
SPAN_END_BEFORE_START = "span_end_before_start"
DUPLICATE_SPAN = "duplicate_span"  # a second manifest row (or span) giving a clip already planned
# recipe (schemas/recipe.py)
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
REDUNDANT_CLIP = "redundant_clip"  # contains no keyframe
CATEGORY_QUOTA_FULL = "category_quota_full"
NO_EMBEDDING = "no_frames_to_embed"
# clip+decode
FFMPEG_FAILED = "ffmpeg_failed"
FFMPEG_TIMEOUT = "ffmpeg_timeout"
NO_FRAMES = "no_frames_decoded"
# any stage
INTERNAL_ERROR = "internal_error"
