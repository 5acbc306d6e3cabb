"""Reading videos (engine/video.py): timestamps, decoded frames, rotation, animations, frame
folders, and clear errors. Videos are written by the test with PyAV (tests/video_fixtures.py)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("av")  # the `video` extra; CI installs it with the `test` extra

from phi3v.engine.frame_select import FrameSelection, select_frames
from phi3v.engine.image import ImageSourcePolicy
from phi3v.engine.video import open_video
from phi3v.errors import VideoError
from video_fixtures import (CODEC_TOLERANCE, HEIGHT, WIDTH, away_from_bar, colour_at, expected_frame, write_frame_folder,
                            write_gif, write_video)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", seconds=3, fps=10)


def max_error(image, expected) -> int:
    got = np.asarray(image, dtype=np.int16)
    return int(np.abs(away_from_bar(got) - away_from_bar(expected.astype(np.int16))).max())


def test_probe_gives_exact_timestamps(clip):
    with open_video(clip) as reader:
        info = reader.info
        assert (info.kind, info.frame_count, info.width, info.height, info.rotation) == ("video", 30, WIDTH, HEIGHT, 0)
        assert info.times == pytest.approx([i / 10 for i in range(30)], abs=1e-9)
        assert info.duration == pytest.approx(3.0)


@pytest.mark.parametrize("indices", [[0, 5, 12, 29], [3, 11, 18, 26], [29]])
def test_decoded_frames_equal_the_written_ones(clip, indices):
    with open_video(clip) as reader:
        images = list(reader.frames(indices))
    assert [im.size for im in images] == [(WIDTH, HEIGHT)] * len(indices)
    for i, im in zip(indices, images):
        assert max_error(im, expected_frame(i, 10)) <= CODEC_TOLERANCE, f"frame {i}"


def test_seeking_far_ahead_and_back_gives_the_same_frames(tmp_path, monkeypatch):
    import phi3v.engine.video as video

    path = write_video(tmp_path / "long.mp4", seconds=6, fps=5)
    monkeypatch.setattr(video, "SEEK_AHEAD_S", 0.5)  # every pick below seeks
    with open_video(path) as reader:
        for i, im in zip([2, 27, 28], reader.frames([2, 27, 28])):
            assert max_error(im, expected_frame(i, 5)) <= CODEC_TOLERANCE
        im = next(reader.frames([1]))  # behind the last decoded frame: seeks back
        assert max_error(im, expected_frame(1, 5)) <= CODEC_TOLERANCE


def test_webm(tmp_path):
    path = write_video(tmp_path / "clip.webm", seconds=2, fps=5, codec="libvpx-vp9")
    with open_video(path) as reader:
        assert reader.info.times == pytest.approx([i / 5 for i in range(10)], abs=1e-3)
        im = next(reader.frames([7]))
    assert max_error(im, expected_frame(7, 5)) <= CODEC_TOLERANCE


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_metadata_is_applied(tmp_path, rotation):
    path = write_video(tmp_path / "rot.mp4", seconds=1, fps=5, rotation=rotation)
    with open_video(path) as reader:
        ccw = rotation % 360
        assert reader.info.rotation == ccw
        assert (reader.info.width, reader.info.height) == ((HEIGHT, WIDTH) if ccw in (90, 270) else (WIDTH, HEIGHT))
        got = np.asarray(next(reader.frames([0])))
    # the white bar on the left, turned counter-clockwise: 90 -> bottom, 270 -> top, 180 -> right
    bar = {90: got[-4:, :], 270: got[:4, :], 180: got[:, -4:]}[ccw]
    rest = {90: got[:-HEIGHT // 2], 270: got[HEIGHT // 2:], 180: got[:, : WIDTH // 2]}[ccw]
    assert bar.min() >= 255 - CODEC_TOLERANCE
    assert np.abs(rest.astype(int) - colour_at(0)).max() <= CODEC_TOLERANCE


def test_old_rotate_tag_is_applied(tmp_path):
    path = write_video(tmp_path / "tag.mkv", seconds=1, fps=5, rotate_tag="90")  # 90 degrees clockwise
    with open_video(path) as reader:
        assert (reader.info.rotation, reader.info.width, reader.info.height) == (270, HEIGHT, WIDTH)
        got = np.asarray(next(reader.frames([0])))
    assert got[:4].min() >= 255 - CODEC_TOLERANCE  # the left bar, turned clockwise, is on top
    assert np.abs(got[HEIGHT // 2:].astype(int) - colour_at(0)).max() <= CODEC_TOLERANCE


def test_rotation_drives_the_token_plan(tmp_path):
    from phi3v.engine.video_plan import plan_video

    path = write_video(tmp_path / "rot.mp4", seconds=1, fps=5, rotation=90, width=672, height=336)
    with open_video(path) as reader:
        plan = plan_video(reader, FrameSelection(frames=2), num_crops=4, context=4096)
        assert [(f.width, f.height) for f in plan.frames] == [(336, 672)] * 2
        assert next(reader.frames([plan.indices[0]])).size == (336, 672)


def test_animated_gif_uses_frame_durations(tmp_path):
    path = write_gif(tmp_path / "a.gif", [100, 200, 300, 400])
    with open_video(path) as reader:
        assert reader.info.kind == "animation"
        assert reader.info.times == pytest.approx([0.0, 0.1, 0.3, 0.6])
        assert reader.info.duration == pytest.approx(1.0)
        assert select_frames(reader.info.times, reader.info.duration, FrameSelection(fps=4)) == [0, 1, 2, 3]
        frames = list(reader.frames([1, 3]))
    assert [f.getpixel((5, 5)) for f in frames] == [colour_at(1), colour_at(3)]


def test_folder_of_frames_in_natural_order(tmp_path):
    folder = write_frame_folder(tmp_path / "frames", count=12)
    with open_video(folder) as reader:
        assert (reader.info.kind, reader.info.frame_count, reader.info.duration) == ("folder", 12, 12.0)
        picks = select_frames(reader.info.times, reader.info.duration, FrameSelection(frames=3))
        assert picks == [2, 6, 10]  # floor(12/6), floor(36/6), floor(60/6)
        got = [im.getpixel((1, 1)) for im in reader.frames(picks)]
    assert got == [colour_at(2), colour_at(6), colour_at(10)]  # frame3.png, frame7.png, frame11.png


@pytest.mark.parametrize("suffix, codec", [("mp4", "libx264"), ("webm", "libvpx-vp9"), ("mkv", "libx264"),
                                           ("avi", "mpeg4")])
def test_truncated_file_names_the_file(tmp_path, suffix, codec):
    whole = write_video(tmp_path / f"whole.{suffix}", seconds=3, fps=10, codec=codec)
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=rf"^{cut}: .*(truncated|holds no frames)"):
        open_video(cut)


def test_corrupt_and_missing_files_are_clear(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 4096)
    with pytest.raises(VideoError, match="bad.mp4: not a readable video file"):
        open_video(bad)
    with pytest.raises(VideoError, match="nope.mp4: no such file or folder"):
        open_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoError, match="holds no frame images"):
        open_video(tmp_path)
    with pytest.raises(VideoError, match="paths are not allowed here"):
        open_video(str(bad), ImageSourcePolicy(allow_paths=False))


def test_data_uri_and_bytes(clip):
    import base64

    uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    for source in (uri, clip.read_bytes()):
        with open_video(source) as reader:
            assert reader.info.frame_count == 30
    with pytest.raises(VideoError, match="media type 'text/plain'"):
        open_video("data:text/plain;base64,AAAA")


def test_missing_pyav_is_one_line(monkeypatch):
    import builtins

    import phi3v.engine.video as video

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("no av")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(VideoError, match=r"^reading video files needs PyAV: pip install 'phi3v\[video\]'$"):
        video.require_av()
