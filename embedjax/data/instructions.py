"""Instruction-aware training: per-source prompts from templates with a ``{task}`` field.

Embedders such as Qwen3-Embedding, E5-Mistral and NV-Embed put an instruction before every
query (``"Instruct: {task}\\nQuery:"``, the task naming the source's retrieval problem) and none
before documents. Here a template is filled with each training source's task
(``data.tasks[source]``); the prompt is tokenized apart from the text, and with
``include_prompt=False`` its tokens are attended to but left out of pooling. The exported
sentence-transformers folder carries the same prompts (`export_prompts`), so
``SentenceTransformer.encode(texts, prompt_name=...)`` behaves as embedjax trained.
"""
from __future__ import annotations

import pathlib
import string
from typing import Mapping, Sequence

FIELD = "task"


def source_name(path: str) -> str:
    """A training source's name: its folder or file stem (``scifact``, ``triplets``)."""
    return pathlib.Path(path.rstrip("/")).stem


def check_template(template: str, where: str) -> None:
    """A template must have exactly the ``{task}`` field; anything else is an error naming it."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"{where}={template!r} is not a valid template ({err}); write e.g. "
                         "'Instruct: {task}\\nQuery:'") from None
    if FIELD not in fields:
        raise ValueError(f"{where}={template!r} has no {{{FIELD}}} field for the source's task; write e.g. "
                         "'Instruct: {task}\\nQuery:' (or leave it empty for no instruction)")
    extra = sorted(set(fields) - {FIELD})
    if extra:
        raise ValueError(f"{where}={template!r} has fields {extra} besides {{{FIELD}}}; escape literal braces as "
                         "{{ and }}")


def source_prompts(sources: Sequence[str], *, query_template: str = "", document_template: str = "",
                   tasks: Mapping[str, str] | None = None) -> list[tuple[str | None, str | None]]:
    """``(query prompt, document prompt)`` per source (None where no template is set). Every source
    needs a task when a template is set, and every task must name a source."""
    tasks = dict(tasks or {})
    names = [source_name(s) for s in sources]
    if not query_template and not document_template:
        if tasks:
            raise ValueError(f"data.tasks is set ({sorted(tasks)}) but neither data.query_instruction nor "
                             "data.document_instruction is: set a template with a {task} field")
        return [(None, None)] * len(names)
    for template, where in ((query_template, "data.query_instruction"),
                            (document_template, "data.document_instruction")):
        if template:
            check_template(template, where)
    missing = [n for n in names if n not in tasks]
    if missing:
        raise ValueError(f"data.tasks has no task for source(s) {missing}; give one per source of data.train "
                         f"({names}), e.g. --config.data.tasks.{missing[0]}='Given a claim, retrieve evidence'")
    unknown = sorted(set(tasks) - set(names))
    if unknown:
        raise ValueError(f"data.tasks names {unknown}, which are not sources of data.train ({names})")
    return [(query_template.format(task=tasks[n]) if query_template else None,
             document_template.format(task=tasks[n]) if document_template else None) for n in names]


def export_prompts(sources: Sequence[str], prompts: Sequence[tuple[str | None, str | None]]) -> dict[str, str]:
    """The prompts for ``config_sentence_transformers.json``: ``<source>_query`` /
    ``<source>_document`` for each source, and ``query`` / ``document`` (what
    ``encode_query`` / ``encode_document`` use) from the first source."""
    out: dict[str, str] = {}
    for source, (query, document) in zip(sources, prompts):
        name = source_name(source)
        if query:
            out[f"{name}_query"] = query
        if document:
            out[f"{name}_document"] = document
    if prompts:
        query, document = prompts[0]
        if query:
            out["query"] = query
        if document:
            out["document"] = document
    return out
