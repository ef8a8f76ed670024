from stages.sampling import frames_in_span, release_frame_indices


def test_release_indices_match_videollama2_uniform_sampling():
    # 100 frames, 4 samples: segment 99/4 = 24.75 -> mids 12.375, 37.125, 61.875, 86.625
    assert release_frame_indices(100, 4) == [12, 37, 62, 87]
    # exact halves round up (the release adds 1e-6 before rounding)
    assert release_frame_indices(3, 2) == [1, 2]  # mids 0.5, 1.5


def test_fewer_frames_than_requested_repeats_indices():
    indices = release_frame_indices(5, 8)
    assert len(indices) == 8
    assert indices == sorted(indices)
    assert set(indices) <= set(range(5))
    assert len(set(indices)) < 8


def test_no_frames():
    assert release_frame_indices(0, 32) == []


def test_frames_in_span_is_half_open():
    times = [i / 10 for i in range(20)]
    assert frames_in_span(times, 0.5, 1.0) == [0.5, 0.6, 0.7, 0.8, 0.9]
