"""Prompt datasets: the verl RL parquet schema (DAPO-Math-17k) and jsonl, read into PromptExample.

Accepted row layouts (parquet or jsonl, one object per line):

- DAPO-Math-17k / verl RL: ``data_source`` (str), ``prompt`` (list of ``{role, content}``),
  ``ability`` (str), ``reward_model`` ({``ground_truth``: str, ``style``: str}),
  ``extra_info`` ({``index``: int}).
- AIME style (jsonl or parquet): ``problem`` (str) and ``answer`` (str or integer, e.g. 0-999).

Every row is checked. A malformed one (a missing field, a wrong type, an empty prompt, a ground
truth that is not a non-empty string, a jsonl line or parquet string that is not valid UTF-8) is
reported with its file and row number (and, for jsonl, its line) and, by ``on_malformed_row``,
either skipped and counted ("skip") or raised ("error"); it never reaches the reward. A file that
is missing, unreadable or of an unknown format raises :class:`DataError` naming it, and so does a
file listed twice.

Example ids are ``<resolved file path>#<row>``, so they are unique across all the files of a
load (two files that share a basename in different folders included); rollout request ids are
built from them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ROLES = ("system", "user", "assistant")
_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}


class DataError(ValueError):
    """A data file or row a user must fix; the message names the file (and row)."""


@dataclass(frozen=True, slots=True)
class PromptExample:
    """One prompt with its verifiable answer."""

    id: str
    """``<resolved file path>#<row>``: unique across the files of a load, stable across runs."""
    messages: tuple[dict[str, str], ...]
    """Chat messages ``{"role", "content"}`` (a bare problem string becomes one user message)."""
    ground_truth: str
    """Reference answer handed to the reward."""
    data_source: str
    """Dataset name (``data_source`` column, else the file stem); rewards may dispatch on it."""
    file: str
    """File the row came from."""
    row: int
    """0-based record index in ``file`` (jsonl: counting non-blank lines)."""


@dataclass(frozen=True, slots=True)
class MalformedRow:
    """A row that was rejected, and why."""

    file: str
    row: int
    reason: str
    line: int | None = None
    """1-based line of a jsonl row (rows skip blank lines); None for parquet."""

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: row {self.row}: {self.reason}"


@dataclass(frozen=True, slots=True)
class _Unreadable:
    """A record that could not be decoded (bad bytes, bad JSON); ``reason`` says how."""

    reason: str


@dataclass(slots=True)
class LoadReport:
    """What a load produced: the good examples and the rejected rows."""

    examples: list[PromptExample] = field(default_factory=list)
    malformed: list[MalformedRow] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    """Resolved path -> path as given, of every file read into this report (in order)."""

    @property
    def num_skipped(self) -> int:
        return len(self.malformed)


def file_format(path: str | Path, declared: str | None = None) -> Literal["parquet", "jsonl"]:
    """The format of ``path``: ``declared`` when given, else from the extension."""
    if declared is not None:
        if declared not in ("parquet", "jsonl"):
            raise DataError(f"{path}: unknown data format {declared!r} (parquet or jsonl)")
        return declared  # type: ignore[return-value]
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise DataError(
            f"{path}: unknown file extension {suffix!r}; expected one of {sorted(_FORMATS)} "
            "(or set data.format)"
        )
    return _FORMATS[suffix]  # type: ignore[return-value]


Record = tuple[int, int | None, Any]
"""(row, jsonl line or None, the record or an :class:`_Unreadable`)."""


def _parquet_records(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Record batches, not the whole table as Python objects at once: DAPO-Math-17k as released
    # repeats its prompts to about 1.8 M rows.
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=8192)
        row = 0
        for batch in batches:
            for record in _batch_records(batch):
                yield row, None, record
                row += 1
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable parquet file: {error}") from None


def _batch_records(batch: Any) -> list[Any]:
    """The rows of a record batch as dicts; a row with a string that is not valid UTF-8 (parquet
    does not enforce it) becomes an :class:`_Unreadable` naming the column, not a failed file."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    records = []
    for index in range(batch.num_rows):
        row = batch.slice(index, 1)
        try:
            records.append(row.to_pylist()[0])
        except UnicodeDecodeError as error:
            bad = [name for name in row.schema.names if not _decodes(row.column(name))] or ["?"]
            records.append(_Unreadable(f"column {bad[0]!r} is not valid UTF-8: {error.reason}"))
    return records


def _decodes(column: Any) -> bool:
    try:
        column.to_pylist()
    except UnicodeDecodeError:
        return False
    return True


def _jsonl_records(path: Path) -> Iterator[Record]:
    """Each non-blank line as (row, line, object); a line that is not UTF-8 or not JSON yields an
    :class:`_Unreadable`, so one bad line is one malformed row, not a rejected file."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise DataError(f"{path}: cannot open: {error}") from None
    with handle:
        row = 0
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                byte = raw[error.start : error.start + 1].hex()
                record: Any = _Unreadable(
                    f"not valid UTF-8 (byte 0x{byte} at column {error.start + 1}): {error.reason}"
                )
            else:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    record = _Unreadable(f"invalid JSON: {error}")
            yield row, line_number, record
            row += 1


def _lookup(row: Mapping[str, Any], dotted: str) -> Any:
    """Value at ``a.b.c`` inside nested mappings; raises KeyError naming the missing part."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _messages(value: Any, key: str) -> tuple[dict[str, str], ...]:
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise ValueError(f"{key!r} must be a string or a list of chat messages, got {value!r:.80}")
    if len(value) == 0:
        raise ValueError(f"{key!r} is empty")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise ValueError(f"{key}[{i}] must be a {{role, content}} mapping, got {message!r:.80}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{key}[{i}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{key}[{i}].content must be a string, got {content!r:.80}")
        messages.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in messages):
        raise ValueError(f"{key!r} has only empty messages")
    return tuple(messages)


def _ground_truth(value: Any, key: str) -> str:
    # AIME-style files store the answer as an integer; anywhere else the answer must be a string
    # so that a stray float or null is never compared as if it were the intended answer.
    if (
        key.rsplit(".", 1)[-1] == "answer"
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__} {value!r:.80}")
    if not value.strip():
        raise ValueError(f"{key!r} is empty")
    return value


def _keys(
    row: Mapping[str, Any], prompt_key: str | None, answer_key: str | None
) -> tuple[str, str]:
    if prompt_key is None:
        prompt_key = "problem" if "prompt" not in row and "problem" in row else "prompt"
    if answer_key is None:
        aime_style = "reward_model" not in row and ("answer" in row or prompt_key == "problem")
        answer_key = "answer" if aime_style else "reward_model.ground_truth"
    return prompt_key, answer_key


def parse_row(
    row: Any,
    *,
    file: str,
    index: int,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    id_prefix: str | None = None,
) -> PromptExample:
    """One record -> :class:`PromptExample`; raises ValueError saying what is wrong with it.

    ``id_prefix``: the example id is ``<id_prefix>#<index>`` (default: ``file`` resolved).
    """
    if isinstance(row, _Unreadable):
        raise ValueError(row.reason)
    if not isinstance(row, Mapping):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    prompt_key, answer_key = _keys(row, prompt_key, answer_key)
    try:
        messages = _messages(_lookup(row, prompt_key), prompt_key)
        ground_truth = _ground_truth(_lookup(row, answer_key), answer_key)
    except KeyError as error:
        raise ValueError(f"missing field {error.args[0]!r}") from None
    name = os.path.basename(file)  # os.path: Path() per row is a large share of a 1.8 M-row load
    data_source = row.get("data_source", os.path.splitext(name)[0])
    if not isinstance(data_source, str) or not data_source:
        raise ValueError(f"'data_source' must be a non-empty string, got {data_source!r:.80}")
    prefix = os.path.realpath(file) if id_prefix is None else id_prefix
    return PromptExample(
        id=f"{prefix}#{index}",
        messages=messages,
        ground_truth=ground_truth,
        data_source=data_source,
        file=file,
        row=index,
    )


def read_prompt_file(
    path: str | Path,
    *,
    format: str | None = None,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    on_malformed_row: Literal["skip", "error"] = "skip",
    report: LoadReport | None = None,
) -> LoadReport:
    """Read one parquet / jsonl file; malformed rows are skipped into ``report.malformed`` or raised.

    Rows are appended to ``report`` (a new one when None), which is returned.
    """
    if on_malformed_row not in ("skip", "error"):
        raise ValueError(f"on_malformed_row must be 'skip' or 'error', got {on_malformed_row!r}")
    path = Path(path)
    kind = file_format(path, format)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    report = LoadReport() if report is None else report
    # Ids come from the resolved path, so a file read twice (listed twice, or once through a
    # link or another relative path) would repeat every id: refuse it rather than guess whether
    # the user meant verl's "concatenate" (double weight) or a slip.
    resolved = os.path.realpath(path)
    if resolved in report.files:
        raise DataError(
            f"{path}: data file listed twice (the same file as {report.files[resolved]!r}); "
            "list each file once (to weight it more, copy it under another name)"
        )
    report.files[resolved] = str(path)
    records = _parquet_records(path) if kind == "parquet" else _jsonl_records(path)
    for index, line, record in records:
        try:
            example = parse_row(
                record,
                file=str(path),
                index=index,
                prompt_key=prompt_key,
                answer_key=answer_key,
                id_prefix=resolved,
            )
        except ValueError as error:
            bad = MalformedRow(str(path), index, str(error), line)
            if on_malformed_row == "error":
                raise DataError(f"malformed row: {bad} (data.on_malformed_row=error)") from None
            report.malformed.append(bad)
            continue
        report.examples.append(example)
    return report


def load_prompt_files(
    paths: Sequence[str | Path],
    *,
    format: str | None = None,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    on_malformed_row: Literal["skip", "error"] = "skip",
) -> LoadReport:
    """Read several files in order into one report (the caller reports skipped rows once)."""
    if len(paths) == 0:
        raise DataError("no data files given")
    report = LoadReport()
    for path in paths:
        read_prompt_file(
            path,
            format=format,
            prompt_key=prompt_key,
            answer_key=answer_key,
            on_malformed_row=on_malformed_row,
            report=report,
        )
    if not report.examples:
        raise DataError(
            f"no usable rows in {[str(p) for p in paths]} ({report.num_skipped} malformed)"
        )
    return report


def load_from_config(data_config: Any, split: Literal["train", "eval"]) -> LoadReport:
    """Read ``data.train_files`` or ``data.eval_files`` with the section's keys and policy."""
    files = data_config.train_files if split == "train" else data_config.eval_files
    return load_prompt_files(
        files,
        format=data_config.format,
        prompt_key=data_config.prompt_key,
        answer_key=data_config.answer_key,
        on_malformed_row=data_config.on_malformed_row,
    )
