"""`phi3v video CLIP -p QUESTION`: ask about a video (and `phi3v describe clip.mp4`, which lands here).

The clip (a video file, an animated GIF/WebP, or a folder of frame images) is probed before the
model loads (a bad file fails in milliseconds); its frames (--frames / --fps / --start / --end,
docs/video.md) become the prompt's images at --num-crops 4 unless given; the answer streams to
stdout, or comes whole with --no-stream, or as one JSON object with --json (with the frames used).
"""

from __future__ import annotations

import os

from .. import tasks
from .arguments import (HelpFormatter, answer_parent, generation_parent, model_parent, options_from_args,
                        output_parent, video_kwargs, video_parent)
from .remote import add_server_flag

EXAMPLES = """examples:
  phi3v video clip.mp4 -p "What happens?"
  phi3v video clip.mp4 --frames 8 --start 10 --end 40
  phi3v video talk.webm --fps 0.2 --time-labels -p "When is the chart shown?"
  phi3v video slides/ -p "Summarise the deck."          (a folder of frame images, in natural order)
  phi3v describe clip.mp4                               (the describe task on a video)
  phi3v info clip.mp4 --frames 16                       (the frames, tokens and memory, no model load)
  phi3v video clip.mp4 --frames 8 --server http://127.0.0.1:8000   (a running phi3v serve answers)"""

SELECTION_FLAGS = ("frames", "fps", "start", "end", "time_labels")


def is_video_argument(text: str) -> bool:
    """An argument `describe` and `info` treat as a video: a video suffix, or a folder."""
    from ..engine.video_source import has_video_suffix

    return has_video_suffix(text) or os.path.isdir(os.path.expanduser(text))


def selection_given(args) -> bool:
    return any(getattr(args, name, None) not in (None, False) for name in SELECTION_FLAGS)


def register(sub, name: str) -> None:
    p = sub.add_parser(name, parents=[model_parent(), output_parent(), generation_parent(), answer_parent(),
                                      video_parent()],
                       help="ask about a video (file, animated GIF/WebP, folder of frames)",
                       description="video: the clip's frames, in order, as the prompt's images (docs/video.md).",
                       epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("video", metavar="VIDEO", help="MP4/WebM/MOV/MKV/AVI file, animated GIF/WebP, or a folder of frames")
    p.add_argument("-p", "--prompt", default=None, metavar="QUESTION",
                   help="the question (default: a description of what happens)")
    add_server_flag(p)  # --server URL: a running `phi3v serve` answers (the clip goes as a data: URI)
    p.set_defaults(func=run, parser=p)


def run(args) -> int:
    prompt = args.prompt or tasks.VIDEO_DESCRIBE_PROMPT
    return answer_video(args, args.video, prompt)


def answer_video(args, source: str, prompt: str) -> int:
    """Probe the clip, load the model, stream the answer about its frames, report."""
    from ..engine.frame_select import FrameSelection
    from ..engine.video import open_video
    from .loading import load_model_from_args
    from .streaming import stream_answer

    selection = FrameSelection(**video_kwargs(args))  # bad combinations fail before the load
    open_video(source).close()  # the file is readable: probed before the weights are read
    options = options_from_args(args)
    if getattr(args, "server", None):  # a running `phi3v serve` answers: no model load here (cli/remote.py)
        from .remote import remote_answer, video_part

        model, completion = remote_answer(args, prompt, [], options, video=video_part(source, video_kwargs(args)))
        report(args, model, completion, prompt, source, selection, options.num_crops)
        return 0
    model = load_model_from_args(args)
    completion = stream_answer(model, prompt, options, [], args, extra=video_kwargs(args) | {"video": source})
    report(args, model, completion, prompt, source, selection, options.num_crops)
    return 0


def report(args, model, completion, prompt: str, source: str, selection, num_crops) -> None:
    import sys

    from ..engine.frame_select import VIDEO_NUM_CROPS
    from ..engine.video import open_video
    from ..engine.video_plan import plan_video
    from .loading import dtype_name
    from .output import finish_answer, format_timings, note, print_json

    if args.json:
        served_times = getattr(model, "video_frame_times", None)
        if served_times is not None:  # a server chose the frames (it fits them to its --max-images)
            video = {"source": source, "frames": [{"time_s": t} for t in served_times]}
        else:
            with open_video(source) as reader:  # the frames the model saw (the same rules, probed again)
                video = plan_video(reader, selection, num_crops or VIDEO_NUM_CROPS, model.context_length).to_dict()
        timings = completion.timings.to_dict()
        timings["load_s"] = getattr(args, "load_s", None)
        print_json({
            "command": args.command, "model": model.name, "device": str(model.device),
            "dtype": dtype_name(model.dtype) if served_times is None else model.dtype, "prompt": prompt, "video": video,
            "text": completion.text, "finish_reason": completion.finish_reason,
            "usage": completion.usage.to_dict(), "timings": timings,
        })
    elif args.no_stream:
        sys.stdout.write(completion.text)
        finish_answer(completion.text)
    if args.verbose:
        note(format_timings(completion.timings.to_dict(), completion.usage.to_dict(), getattr(args, "load_s", None)))
