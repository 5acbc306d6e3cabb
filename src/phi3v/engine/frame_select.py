"""Which frames of a clip to show the model: the exact selection rules (arithmetic only, no I/O).

A clip is the list of its frames' presentation timestamps t_0 = 0 < t_1 < ... < t_{n-1} (seconds,
counted from the first frame) and its duration D (the end of the last frame). Frame i is on screen
during [t_i, t_{i+1}) (the last one until D). docs/video.md states these rules for users:

1. Window: [start, end), start default 0, end default D (an end past D is D). The candidate frames
   are those on screen at some moment of the window: from the frame on screen at `start` (the last
   i with t_i <= start) to the last frame with t_i < end. M candidates c_0 .. c_{M-1}.
2. frames=N: N >= M takes every candidate; otherwise the middle frame of N equal parts of the
   candidates: c_floor((2j+1) * M / 2N) for j = 0 .. N-1 (integer arithmetic, exact).
3. fps=F: the moments s_k = start + k/F (k = 0, 1, ... while s_k < end), each mapped to the frame
   on screen at s_k (the last i with t_i <= s_k); a frame picked twice (F above the clip's rate)
   is kept once. frames and fps are exclusive.
4. Neither: frames = default_frame_count(tokens per frame, context): at most DEFAULT_MAX_FRAMES
   (16), and no more than fill half the context with image tokens (at least 1).

Time labels (off by default): "frame k at MM:SS" (H:MM:SS from an hour), k counted from 1 in the
selection, the time of the frame's own timestamp rounded down to the second.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from ..errors import VideoError

DEFAULT_MAX_FRAMES = 16  # the model card's multi-frame examples use 8-20 frames
CONTEXT_SHARE = 0.5  # default frames may fill at most this share of the context with image tokens
VIDEO_NUM_CROPS = 4  # the model card: "num_crops=4 for multi-frame, 16 for single-frame"
_TIME_EPS = 1e-9  # s_k computed in floating point may fall a hair before the frame it names


@dataclass(frozen=True)
class FrameSelection:
    """How to pick frames: frames=N or fps=F (not both; neither = the default count), an optional
    [start, end) window in seconds, and whether to label each frame with its time."""

    frames: int | None = None
    fps: float | None = None
    start: float | None = None
    end: float | None = None
    time_labels: bool = False

    def __post_init__(self):
        if self.frames is not None and (isinstance(self.frames, bool) or not isinstance(self.frames, int)
                                        or self.frames < 1):
            raise VideoError(f"frames must be a whole number >= 1, got {self.frames!r}")
        for name in ("fps", "start", "end"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise VideoError(f"{name} must be a number of {'frames per second' if name == 'fps' else 'seconds'}, "
                                 f"got {value!r}")
        if self.fps is not None and self.fps <= 0:
            raise VideoError(f"fps must be > 0, got {self.fps}")
        if self.frames is not None and self.fps is not None:
            raise VideoError("give frames or fps, not both")
        if self.start is not None and self.start < 0:
            raise VideoError(f"start must be >= 0 seconds, got {self.start}")
        if self.end is not None and self.end <= (self.start or 0):
            raise VideoError(f"end ({self.end} s) must be after start ({self.start or 0} s)")


def candidate_range(times: list[float], duration: float, start: float | None, end: float | None) -> range:
    """Rule 1: the indices of the frames on screen during [start, end)."""
    if not times:
        raise VideoError("the video has no frames")
    lo = start or 0.0
    if lo >= duration:
        raise VideoError(f"start ({lo} s) is at or past the end of the video ({duration:.3f} s)")
    hi = duration if end is None else min(end, duration)
    first = max(0, bisect.bisect_right(times, lo + _TIME_EPS) - 1)
    last = bisect.bisect_left(times, hi) - 1  # the last frame with t_i < end
    return range(first, max(first, last) + 1)


def select_frames(times: list[float], duration: float, selection: FrameSelection,
                  default_frames: int = DEFAULT_MAX_FRAMES) -> list[int]:
    """The chosen frame indices, ascending (rules 1-3; default_frames when neither frames nor fps)."""
    cands = candidate_range(times, duration, selection.start, selection.end)
    if selection.fps is not None:
        lo = selection.start or 0.0
        hi = duration if selection.end is None else min(selection.end, duration)
        picks: list[int] = []
        k = 0
        while True:
            s = lo + k / selection.fps
            if s >= hi:
                break
            i = max(cands.start, bisect.bisect_right(times, s + _TIME_EPS) - 1)
            if not picks or picks[-1] != i:
                picks.append(i)
            if i + 1 >= len(times):
                break  # every later moment shows the last frame
            # Skip the moments that still show frame i: the next k whose moment may reach t_{i+1}
            # (one early, against rounding; a repeat is dropped above). So a huge fps costs at most
            # two steps per frame of the clip, not duration x fps steps.
            k = max(k + 1, math.ceil((times[i + 1] - _TIME_EPS - lo) * selection.fps) - 1)
        return picks
    n = selection.frames if selection.frames is not None else default_frames
    m = len(cands)
    if n >= m:
        return list(cands)
    return [cands[(2 * j + 1) * m // (2 * n)] for j in range(n)]


def default_frame_count(tokens_per_frame: int, context: int, text_tokens: int = 0) -> int:
    """Rule 4: min(16, frames whose image tokens fill at most half the context), at least 1."""
    fit = int((context * CONTEXT_SHARE - text_tokens) // max(1, tokens_per_frame))
    return max(1, min(DEFAULT_MAX_FRAMES, fit))


def format_time(seconds: float) -> str:
    """00:12, 01:05, 1:02:03 (whole seconds, rounded down)."""
    s = int(math.floor(seconds + _TIME_EPS))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def time_label(k: int, seconds: float) -> str:
    """The label of the k-th chosen frame (k from 1): "frame 3 at 00:12"."""
    return f"frame {k} at {format_time(seconds)}"
