"""Prompt data: DAPO parquet / jsonl / AIME readers, malformed rows, templates, resumable order."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_fipo.config import load_config
from megatron_fipo.data import (
    DataError,
    GroupBuffer,
    PromptDataLoader,
    PromptSampler,
    load_from_config,
    load_prompt_files,
    read_prompt_file,
)
from megatron_fipo.data.templates import encode_prompt, render_fallback, render_prompt

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def dapo_row(index: int, answer: object = "34", prompt: object = None) -> dict:
    if prompt is None:
        prompt = [{"role": "user", "content": f"Solve problem {index}. Answer: $Answer"}]
    return {
        "data_source": "math_dapo",
        "prompt": prompt,
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": str(index)},
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_reads_the_dapo_parquet_schema(tmp_path):
    rows = [dapo_row(i, answer=str(10 * i)) for i in range(5)]
    path = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = read_prompt_file(path)
    assert report.num_skipped == 0
    assert [e.ground_truth for e in report.examples] == ["0", "10", "20", "30", "40"]
    first = report.examples[3]
    assert first.messages == ({"role": "user", "content": "Solve problem 3. Answer: $Answer"},)
    assert (first.data_source, first.file, first.row) == ("math_dapo", str(path), 3)
    assert first.id == f"{path.resolve()}#3"


def test_reads_aime_jsonl_with_integer_answers(tmp_path):
    path = write_jsonl(
        tmp_path / "aime-2024.jsonl",
        [
            {"id": 60, "problem": "Find x.", "answer": 204},
            "",
            {"problem": "Find y.", "answer": "025"},
        ],
    )
    report = read_prompt_file(path)
    assert [e.ground_truth for e in report.examples] == ["204", "025"]
    assert report.examples[0].messages == ({"role": "user", "content": "Find x."},)
    assert report.examples[1].row == 1  # blank lines are not rows
    assert report.examples[0].data_source == "aime-2024"


MALFORMED = [
    ({"data_source": "x", "reward_model": {"ground_truth": "1"}}, "missing field 'prompt'"),
    (dapo_row(0, answer=None), "must be a string"),
    (dapo_row(0, answer=3.5), "must be a string"),
    (dapo_row(0, answer=7), "must be a string"),  # only AIME's 'answer' column may be an int
    (dapo_row(0, answer="  "), "is empty"),
    (dapo_row(0, prompt=[]), "is empty"),
    (dapo_row(0, prompt=[{"role": "user", "content": ""}]), "only empty messages"),
    (dapo_row(0, prompt=[{"role": "robot", "content": "hi"}]), "role must be one of"),
    (dapo_row(0, prompt=[{"role": "user", "content": 5}]), "content must be a string"),
    (dapo_row(0, prompt=42), "must be a string or a list"),
    ({"problem": "Find x.", "answer": True}, "must be a string"),
    ({"problem": "Find x."}, "missing field 'answer'"),
    ('{"problem": "unterminated', "invalid JSON"),
    ([1, 2], "a row must be an object"),
]


@pytest.mark.parametrize("bad,reason", MALFORMED)
def test_malformed_row_is_skipped_with_file_and_row_or_raises(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "train.jsonl", [dapo_row(0), dapo_row(1), bad, dapo_row(3)])
    report = read_prompt_file(path, on_malformed_row="skip")
    assert [e.row for e in report.examples] == [0, 1, 3]  # the bad row never reaches the reward
    assert report.num_skipped == 1
    (skipped,) = report.malformed
    assert (skipped.file, skipped.row, skipped.line) == (str(path), 2, 3)
    assert reason in skipped.reason
    with pytest.raises(DataError, match=rf"train\.jsonl:3: row 2: .*{reason[:12]}"):
        read_prompt_file(path, on_malformed_row="error")


def test_malformed_parquet_rows_name_their_row(tmp_path):
    rows = [dapo_row(0), dapo_row(1, answer=None), dapo_row(2)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = read_prompt_file(path)
    assert [str(bad) for bad in report.malformed] == [
        f"{path}: row 1: 'reward_model.ground_truth' must be a string, got NoneType None"
    ]


def test_bad_files_raise_naming_the_file(tmp_path):
    with pytest.raises(DataError, match=r"missing\.parquet: data file not found"):
        read_prompt_file(tmp_path / "missing.parquet")
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet at all")
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable parquet file"):
        read_prompt_file(fake)
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown file extension '\.csv'"):
        read_prompt_file(csv)
    assert len(read_prompt_file(csv.rename(tmp_path / "d.txt"), format="jsonl").examples) == 0
    with pytest.raises(DataError, match="no usable rows"):
        load_prompt_files([write_jsonl(tmp_path / "bad.jsonl", [{"problem": "x"}])])


def test_custom_keys_and_several_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": "1+1?", "meta": {"sol": "2"}}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": "2+2?", "meta": {"sol": "4"}}])
    report = load_prompt_files([a, b], prompt_key="question", answer_key="meta.sol")
    assert [(e.id, e.ground_truth) for e in report.examples] == [
        (f"{a.resolve()}#0", "2"),
        (f"{b.resolve()}#0", "4"),
    ]


def test_files_sharing_a_basename_get_distinct_request_ids(tmp_path):
    from megatron_fipo.rollout.engine import GenerationRequest, validate_requests

    (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
    paths = [write_jsonl(tmp_path / d / "train.jsonl", [dapo_row(0), dapo_row(1)]) for d in "xy"]
    examples = load_prompt_files(paths).examples
    assert len({e.id for e in examples}) == 4
    assert examples[2].id == f"{paths[1].resolve()}#0"
    # As the trainer builds them: one request per (prompt, sample).
    validate_requests(
        [
            GenerationRequest(prompt_token_ids=[1], request_id=f"{e.id}/{j}")
            for e in examples
            for j in range(2)
        ]
    )


def test_a_file_listed_twice_is_refused_naming_it(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", [dapo_row(0)])
    with pytest.raises(DataError, match=r"train\.jsonl: data file listed twice"):
        load_prompt_files([path, path])
    (tmp_path / "link.jsonl").symlink_to(path)
    monkeypatch.chdir(tmp_path)
    message = rf"^link\.jsonl: data file listed twice \(the same file as '{path}'\); list each"
    with pytest.raises(DataError, match=message):
        load_prompt_files([path, "link.jsonl"])
    with pytest.raises(DataError, match="listed twice"):
        load_prompt_files(["train.jsonl", "./train.jsonl"])


def test_an_undecodable_jsonl_line_is_one_malformed_row(tmp_path):
    path = tmp_path / "train.jsonl"
    good = [json.dumps(dapo_row(i)).encode() for i in range(3)]
    bad = json.dumps(dapo_row(9)).encode().replace(b"Solve", b"So\xfflve")
    path.write_bytes(b"\n".join([good[0], b"", bad, good[1], good[2]]) + b"\n")
    report = read_prompt_file(path, on_malformed_row="skip")
    assert [e.row for e in report.examples] == [0, 2, 3]
    assert [str(bad) for bad in report.malformed] == [
        f"{path}:3: row 1: not valid UTF-8 (byte 0xff at column {bad.index(0xFF) + 1}): "
        "invalid start byte"
    ]
    with pytest.raises(DataError, match=r"train\.jsonl:3: row 1: not valid UTF-8 \(byte 0xff"):
        read_prompt_file(path, on_malformed_row="error")


def _invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A string column holding raw bytes (parquet writers do not all validate UTF-8)."""
    offsets = pa.array([sum(map(len, values[:i])) for i in range(len(values) + 1)], pa.int32())
    data = pa.py_buffer(b"".join(values))
    return pa.Array.from_buffers(pa.string(), len(values), [None, offsets.buffers()[1], data])


def test_an_undecodable_parquet_string_is_one_malformed_row(tmp_path):
    problems = _invalid_utf8_strings([b"Find x.", b"Find \xfe y.", b"Find z."])
    path = tmp_path / "aime.parquet"
    pq.write_table(pa.table({"problem": problems, "answer": ["1", "2", "3"]}), path)
    report = read_prompt_file(path, on_malformed_row="skip")
    assert [(e.row, e.ground_truth) for e in report.examples] == [(0, "1"), (2, "3")]
    assert [str(bad) for bad in report.malformed] == [
        f"{path}: row 1: column 'problem' is not valid UTF-8: invalid start byte"
    ]
    with pytest.raises(DataError, match=r"aime\.parquet: row 1: column 'problem' is not valid"):
        read_prompt_file(path, on_malformed_row="error")


def test_load_from_config_follows_the_data_section(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [dapo_row(0), dapo_row(1, answer=None)])
    config = load_config(
        CONFIGS / "tiny-cpu.yaml",
        [f"data.train_files=[{path}]", "data.on_malformed_row=skip"],
    )
    assert load_from_config(config.data, "train").num_skipped == 1
    strict = load_config(CONFIGS / "tiny-cpu.yaml", [f"data.train_files=[{path}]"])
    with pytest.raises(DataError, match="row 1"):
        load_from_config(strict.data, "train")


# ---- templates ------------------------------------------------------------------------------


class _NoTemplateTokenizer:
    """Character-level stand-in with no chat template (transformers tokenizers are tested in
    test_data_synthetic.py with the real locally trained tokenizer)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_fallback_format_without_a_chat_template():
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"})
    expected = "System: Be brief.\n\nUser: 1+1?\n\nAssistant:"
    assert render_fallback(messages) == expected
    tokenizer = _NoTemplateTokenizer()
    assert render_prompt(tokenizer, messages, apply_chat_template=True) == expected
    assert encode_prompt(tokenizer, messages) == [1] + [ord(c) for c in expected]


# ---- sampler and surplus buffer -------------------------------------------------------------


def test_sampler_covers_each_epoch_and_reshuffles():
    sampler = PromptSampler(10, 3, seed=7)  # drop_last: 3 batches per epoch, 1 prompt unused
    epoch0 = [sampler.next_batch() for _ in range(3)]
    epoch1 = [sampler.next_batch() for _ in range(3)]
    assert sampler.epoch == 1 and sampler.batches_per_epoch == 3
    flat0, flat1 = sum(epoch0, []), sum(epoch1, [])
    assert len(set(flat0)) == 9 and set(flat0) <= set(range(10))
    assert flat0 != flat1
    assert (
        list(PromptSampler(10, 3, seed=7).order(1)[:9]) == flat1
    )  # epoch order is seeded by epoch
    assert flat0 != sum([PromptSampler(10, 3, seed=8).next_batch() for _ in range(3)], [])


def test_sampler_without_shuffle_or_drop_last():
    sampler = PromptSampler(5, 2, shuffle=False, drop_last=False, num_epochs=2)
    batches = []
    while not sampler.exhausted:
        batches.append(sampler.next_batch())
    assert batches == [[0, 1], [2, 3], [4], [0, 1], [2, 3], [4]]
    with pytest.raises(StopIteration):
        sampler.next_batch()


@pytest.mark.parametrize("stop_after", [0, 2, 3, 7])
def test_sampler_resume_continues_exactly(stop_after):
    reference = PromptSampler(11, 4, seed=3)
    expected = [reference.next_batch() for _ in range(10)]
    first = PromptSampler(11, 4, seed=3)
    got = [first.next_batch() for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # survives serialization
    resumed = PromptSampler(11, 4, seed=3)
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(10 - stop_after)]
    assert got == expected


def test_sampler_refuses_a_mismatched_state_and_bad_sizes():
    state = PromptSampler(11, 4, seed=3).state_dict()
    with pytest.raises(ValueError, match="num_prompts=11, this run has 12"):
        PromptSampler(12, 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3, this run has 4"):
        PromptSampler(11, 4, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="larger than the dataset"):
        PromptSampler(3, 4)


def test_data_loader_returns_items_and_resumes():
    items = [f"p{i}" for i in range(6)]
    loader = PromptDataLoader(items, 2, seed=0)
    first = loader.next_batch()
    assert len(first) == 2 and set(first) <= set(items)
    twin = PromptDataLoader(items, 2, seed=0)
    twin.load_state_dict(loader.state_dict())
    assert twin.next_batch() == loader.next_batch()


def test_group_buffer_keeps_the_surplus_in_order():
    buffer: GroupBuffer[str] = GroupBuffer()
    buffer.add(["g0", "g1", "g2"])
    assert not buffer.has(4)
    buffer.add(["g3", "g4"])
    assert buffer.take(4) == ["g0", "g1", "g2", "g3"]
    restored: GroupBuffer[str] = GroupBuffer()
    restored.load_state_dict(buffer.state_dict())
    restored.add(["g5"])
    assert len(restored) == 2 and restored.take(2) == ["g4", "g5"]
    with pytest.raises(ValueError, match="holds 0 groups, 1 requested"):
        restored.take(1)
