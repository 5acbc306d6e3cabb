"""Frame selection rules (engine/frame_select.py): exact indices for frames=N, fps=F, windows."""

from __future__ import annotations

import pytest

from phi3v.engine.frame_select import (FrameSelection, default_frame_count, format_time, select_frames,
                                       time_label)
from phi3v.engine.video_source import frame_files, has_video_suffix, natural_key
from phi3v.errors import VideoError

TEN_FPS = [i / 10 for i in range(30)]  # 3 s at 10 fps, duration 3.0


def pick(**kw):
    return select_frames(TEN_FPS, 3.0, FrameSelection(**kw))


def test_frames_n_takes_the_middle_of_n_equal_parts():
    # M = 30, N = 4: floor((2j+1) * 30 / 8) = 3, 11, 18, 26
    assert pick(frames=4) == [3, 11, 18, 26]
    assert pick(frames=1) == [15]
    assert pick(frames=30) == list(range(30))
    assert pick(frames=100) == list(range(30))  # more than the clip has: every frame once


def test_window_limits_the_candidates():
    # [1.0, 2.0): frames 10..19; N = 2 -> floor(10/4)=2, floor(30/4)=7 -> 12, 17
    assert pick(frames=2, start=1.0, end=2.0) == [12, 17]
    # a start inside a frame's interval includes that frame (on screen at start)
    assert pick(frames=100, start=1.05, end=1.3) == [10, 11, 12]
    assert pick(frames=100, end=99) == list(range(30))  # an end past the clip is the clip's end


def test_fps_maps_each_moment_to_the_frame_on_screen():
    assert pick(fps=1) == [0, 10, 20]
    assert pick(fps=2, start=0.5) == [5, 10, 15, 20, 25]
    assert pick(fps=4, start=2.0, end=3.0) == [20, 22, 25, 27]  # 2.0, 2.25, 2.5, 2.75
    assert pick(fps=25) == list(range(30))  # faster than the clip: each frame once


def _fps_by_every_moment(times, duration, fps, start=None, end=None):
    """The fps rule stepped moment by moment, as written (the reference for the faster loop)."""
    lo, hi = start or 0.0, duration if end is None else min(end, duration)
    first = max(i for i, t in enumerate(times) if t <= lo + 1e-9)
    picks, k = [], 0
    while lo + k / fps < hi:
        s = lo + k / fps
        i = max(first, max(j for j, t in enumerate(times) if t <= s + 1e-9))
        if not picks or picks[-1] != i:
            picks.append(i)
        k += 1
    return picks


@pytest.mark.parametrize("times, duration", [
    (TEN_FPS, 3.0), ([i / 29.97 for i in range(90)], 90 / 29.97), ([0.0, 0.5, 0.6, 2.0], 2.5),
    ([0.0, 0.04, 0.1, 0.7, 0.71, 1.3, 2.2], 2.3)])
@pytest.mark.parametrize("fps", [0.7, 1, 3, 7.5, 10, 24, 29.97, 60, 1000])
@pytest.mark.parametrize("start, end", [(None, None), (0.5, None), (0.1, 1.25)])
def test_fps_skipping_equals_every_moment(times, duration, fps, start, end):
    assert select_frames(times, duration, FrameSelection(fps=fps, start=start, end=end)) == \
        _fps_by_every_moment(times, duration, fps, start, end)


def test_a_huge_fps_costs_steps_per_frame_not_per_moment():
    """fps=1e12 on an hour at 30 fps would be 3.6e15 moments stepped one by one (a server request
    could ask for it); skipping the moments that show the same frame makes it every frame once."""
    times = [i / 30 for i in range(30 * 3600)]
    assert select_frames(times, 3600.0, FrameSelection(fps=1e12)) == list(range(len(times)))


def test_variable_frame_times():
    times = [0.0, 0.5, 0.6, 2.0]  # frame 2 stays on screen from 0.6 to 2.0
    assert select_frames(times, 2.5, FrameSelection(fps=1)) == [0, 2, 3]


def test_default_count_and_explicit_default():
    assert select_frames(TEN_FPS, 3.0, FrameSelection(), default_frames=3) == [5, 15, 25]
    assert default_frame_count(tokens_per_frame=757, context=131072) == 16
    assert default_frame_count(tokens_per_frame=757, context=8192) == 5  # 4096 // 757
    assert default_frame_count(tokens_per_frame=5000, context=4096) == 1


@pytest.mark.parametrize("kw, words", [
    ({"frames": 0}, "frames must be a whole number >= 1"),
    ({"frames": 2.5}, "frames must be a whole number"),
    ({"fps": 0}, "fps must be > 0"),
    ({"fps": float("nan")}, "fps must be a number"),
    ({"frames": 4, "fps": 1}, "frames or fps, not both"),
    ({"start": -1}, "start must be >= 0"),
    ({"start": 2, "end": 1}, "must be after start"),
])
def test_bad_selections_are_clear(kw, words):
    with pytest.raises(VideoError, match=words):
        FrameSelection(**kw)


def test_start_past_the_end_is_clear():
    with pytest.raises(VideoError, match=r"start \(5 s\) is at or past the end of the video \(3.000 s\)"):
        pick(start=5)


def test_time_labels():
    assert time_label(3, 12.9) == "frame 3 at 00:12"
    assert format_time(65) == "01:05"
    assert format_time(3723.5) == "1:02:03"


def test_suffixes_and_natural_order(tmp_path):
    assert has_video_suffix("a/B.MP4") and has_video_suffix("x.webm") and not has_video_suffix("x.gif")
    for name in ("frame10.png", "frame2.png", "frame1.jpg", "Frame3.PNG", "readme.md", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    names = [p.rsplit("/", 1)[-1] for p in frame_files(tmp_path)]
    assert names == ["frame1.jpg", "frame2.png", "Frame3.PNG", "frame10.png"]
    assert sorted(["b10", "b9", "a"], key=natural_key) == ["a", "b9", "b10"]
