"""The built-in task prompts (describe, ocr, table, compare, ask), kept in one place.

The CLI subcommands and the batch runner both build their prompts here, so a prompt is
changed once and shows up everywhere (`phi3v describe --show-prompt` prints it).

    task_prompt("ocr", "markdown")        -> the OCR prompt asking for Markdown
    task_prompt("ask", question="Why?")   -> "Why?" (ask is the user's own question)
    TASKS["table"].formats                -> ("markdown", "csv", "json")

The prompts are plain user text: the chat template and the <|image_k|> tags for the images
are added by the model (phi3v.engine.chat_template), so a prompt never mentions tags itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PromptError

_TABLE_BODY = (
    "Extract the data shown in this image (a table or a chart) as {what}. "
    "Use the table's own column headers; for a chart, use one row per category or x value and "
    "one column per series, with values read from the axes and labels as precisely as possible. "
    "Keep numbers as written, without units in the cells; put units in the headers. "
)


@dataclass(frozen=True)
class Task:
    """One task: its prompt per output format and how many images it takes."""

    name: str
    summary: str  # one line, used as the subcommand's help
    prompts: dict[str, str] = field(default_factory=dict)  # format -> prompt text
    default_format: str | None = None
    min_images: int = 1
    max_images: int | None = 1  # None => any number

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(self.prompts)


TASKS: dict[str, Task] = {
    "describe": Task(
        name="describe",
        summary="a detailed description of an image",
        prompts={
            "text": (
                "Describe this image in detail. Start with one sentence that sums it up, then cover "
                "the main subjects, the setting, notable objects and where they are, colours and "
                "lighting, what any people or animals are doing, and any visible text."
            ),
        },
        default_format="text",
    ),
    "ocr": Task(
        name="ocr",
        summary="the text in an image, in reading order",
        prompts={
            "text": (
                "Transcribe all the text in this image exactly as written, in natural reading order "
                "(top to bottom, left to right, column by column). Keep the original line breaks. "
                "Output only the transcribed text, with no commentary."
            ),
            "markdown": (
                "Transcribe all the text in this image, in natural reading order, as Markdown: "
                "headings as #, lists as - items, tables as Markdown tables, and bold or italic "
                "where the image shows it. Output only the Markdown, with no commentary."
            ),
        },
        default_format="text",
    ),
    "table": Task(
        name="table",
        summary="a chart or table as data",
        prompts={
            "markdown": _TABLE_BODY.format(what="a Markdown table with a header row")
            + "Output only the table.",
            "csv": _TABLE_BODY.format(what="CSV with a header row, comma-separated, quoting any field "
                                      "that contains a comma")
            + "Output only the CSV, with no code fences and no commentary.",
            "json": _TABLE_BODY.format(what='a JSON object: "columns", the column headers, and "rows", '
                                       "one array of cells per row, numbers as JSON numbers")
            + "Output only the JSON, with no code fences and no commentary.",
        },
        default_format="markdown",
    ),
    "compare": Task(
        name="compare",
        summary="what differs between two or more images",
        prompts={
            "text": (
                "Compare these images, referring to them as Image 1, Image 2 and so on. List every "
                "difference you can see: objects added, removed or moved, changes in colour, size, "
                "position, count, text or lighting. Then say briefly what they have in common."
            ),
        },
        default_format="text",
        min_images=2,
        max_images=None,
    ),
    "ask": Task(
        name="ask",
        summary="any question about zero, one or more images",
        prompts={"text": "{question}"},
        default_format="text",
        min_images=0,
        max_images=None,
    ),
}


# The prompt of `phi3v video` and of `describe` given a video (its frames come first, in order).
VIDEO_DESCRIBE_PROMPT = (
    "These are frames of a video, in order. Describe what happens in the video: start with one "
    "sentence that sums it up, then the events in the order they happen, the people, animals and "
    "objects involved, the setting, and anything that changes between the frames."
)


# `table --format json` answers follow this schema (constrained decoding): the headers, then the
# rows as arrays of cells (text or numbers).
TABLE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["columns", "rows"],
    "properties": {
        "columns": {"type": "array", "items": {"type": "string"}},
        "rows": {"type": "array", "items": {"type": "array", "items": {"type": ["string", "number"]}}},
    },
}

EXTRACT_PROMPT = (
    "Extract the information in this image as a JSON object with the fields of this JSON Schema:\n"
    "{schema}\nCopy text and numbers exactly as they appear in the image. Output only the JSON."
)


def task_schema(task: str, fmt: str | None) -> dict | None:
    """The JSON Schema a task's answer is constrained to in format `fmt` (None: free text)."""
    return TABLE_SCHEMA if task == "table" and fmt == "json" else None


def extract_prompt(schema: dict, instructions: str | None = None) -> str:
    """The prompt of `phi3v extract`: the schema (compact) and optional extra instructions."""
    import json

    text = EXTRACT_PROMPT.format(schema=json.dumps(schema, ensure_ascii=False, separators=(",", ":")))
    return f"{text}\n{instructions}" if instructions else text


def get_task(task: str) -> Task:
    try:
        return TASKS[task]
    except KeyError:
        raise PromptError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None


def task_prompt(task: str, fmt: str | None = None, *, question: str | None = None) -> str:
    """The prompt text of `task` in output format `fmt` (None => the task's default format).

    `question` is required for "ask" (its prompt is the question itself) and ignored otherwise.
    Raises PromptError for an unknown task or format, or a missing question.
    """
    t = get_task(task)
    fmt = fmt or t.default_format
    if fmt not in t.prompts:
        raise PromptError(
            f"task {task!r} has no format {fmt!r}; choose one of: {', '.join(t.formats)}"
        )
    text = t.prompts[fmt]
    if "{question}" in text:
        if not question or not question.strip():
            raise PromptError(f"task {task!r} needs a question (e.g. --prompt \"What is this?\")")
        return text.replace("{question}", question)
    return text


def check_image_count(task: str, count: int) -> None:
    """Raise PromptError when `count` images do not suit `task` (compare needs two or more)."""
    t = get_task(task)
    if count < t.min_images:
        raise PromptError(
            f"{task} needs at least {t.min_images} image{'s' if t.min_images > 1 else ''}, got {count}"
        )
    if t.max_images is not None and count > t.max_images:
        raise PromptError(f"{task} takes at most {t.max_images} image(s), got {count}")
