"""What a Classify asks, and every check of it that needs no state: pure functions of the request
and the limits, called by the gateway and by the fuzzer (bench/fuzz.py) alike."""

from __future__ import annotations

import dataclasses

from services.domain import InvalidInput
from services.gateway.labels.files import DEFAULT_TEMPLATE, PLACEHOLDER, LabelSet, transient_set
from services.plumbing.limits import check_images, check_texts
from services.plumbing.settings import Settings


@dataclasses.dataclass(frozen=True)
class Question:
    """What a Classify asks of its image: labels (prompted through `template`) or a label set,
    and how many of the best labels to list (0: all)."""

    labels: tuple[str, ...] = ()
    label_set: str = ""
    template: str = ""
    top_k: int = 0


def check_template(template: str, labels: list[str], max_chars: int) -> str:
    """The template to use ("" means "{}"): exactly one "{}", and every prompt within max_chars."""
    template = template or DEFAULT_TEMPLATE
    if template.count(PLACEHOLDER) != 1:
        raise InvalidInput('template must contain exactly one "{}"')
    extra = len(template) - len(PLACEHOLDER)
    for i, label in enumerate(labels):
        if len(label) + extra > max_chars:
            raise InvalidInput(f"prompt {i} (template + label) exceeds {max_chars} characters")
    return template


def check_question(image, question: Question, settings: Settings) -> tuple[list, LabelSet | None]:
    """The image (a message, None when none was sent) within the limits, as a list of one, and the
    labels of the question as a transient set, or None when it names a served set (which the caller
    resolves). Refused with InvalidInput, whose message names the problem, never the text: no image;
    labels and a label set together; a template with a label set; fewer than 2 labels, too many,
    blank or over-long ones, repeated ones; a template without exactly one "{}" or too long with a
    label."""
    if image is None:
        raise InvalidInput("no image in the request")
    images = check_images([image], settings)
    if question.label_set:
        if question.labels:
            raise InvalidInput("send labels or a label_set, not both")
        if question.template:
            raise InvalidInput("a label set brings its own templates: leave template empty")
        return images, None
    labels = check_texts(list(question.labels), settings, what="label", minimum=2)
    if len(set(labels)) != len(labels):
        raise InvalidInput("labels must be distinct")
    return images, transient_set(labels, check_template(question.template, labels, settings.max_text_chars))


def top_count(top_k: int, count: int) -> int:
    """How many labels an answer lists: top_k, or all `count` when top_k is 0 or more than that."""
    return top_k if 0 < top_k <= count else count
