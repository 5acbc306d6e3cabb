"""The prompt each record is asked with: its own "prompt", else a template filled with its question.

Default templates per metric follow the short-answer instructions the published Phi-3 numbers were
measured with (lmms-eval's phi3v task configs):

    relaxed, anls, vqa, exact   "{question}\nAnswer the question using a single word or phrase."
    choice                      "{question}\n{options}\nAnswer with the option's letter from the given
                                 choices directly."       ({options}: "A. cat\nB. dog" lines)
    cer, wer                    "{question}"  (the question is the transcription request)

A variant's own template (--prompt, repeatable) replaces these; it must contain {question} and may
use {options}. Image tags are added by the chat template (phi3v.engine.chat_template).
"""

from __future__ import annotations

import string

from ..errors import Phi3VError
from .records import EvalRecord

SHORT = "{question}\nAnswer the question using a single word or phrase."
CHOICE = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."
DEFAULT_TEMPLATES = {"relaxed": SHORT, "anls": SHORT, "vqa": SHORT, "exact": SHORT, "choice": CHOICE,
                     "cer": "{question}", "wer": "{question}"}


def check_template(template: str) -> str:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if "question" not in fields:
        raise Phi3VError(f"prompt template {template!r} must contain {{question}}")
    unknown = fields - {"question", "options"}
    if unknown:
        raise Phi3VError(f"prompt template {template!r}: unknown field(s) {sorted(unknown)}; "
                         "use {question} and {options}")
    return template


def options_text(choices) -> str:
    return "\n".join(f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(choices))


def build_prompt(record: EvalRecord, template: str | None = None) -> str:
    if record.prompt is not None:
        return record.prompt
    template = template or DEFAULT_TEMPLATES[record.metric]
    return template.format(question=record.question, options=options_text(record.choices))
