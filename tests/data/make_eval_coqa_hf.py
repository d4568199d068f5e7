"""Writes the project's CoQA fixture (data/coqa-fixture.json, official layout)
in the Hugging Face layout of EleutherAI/coqa: one row per story, each of
questions/answers/additional_answers[k] a struct of column lists.

    python3 tests/data/make_eval_coqa_hf.py   # needs pyarrow

Outputs tests/data/eval-coqa-fixture-hf.parquet (all stories, snappy, as
pyarrow writes by default) and tests/data/eval-coqa-fixture-hf.jsonl (the
first two stories).
"""
import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = pathlib.Path(__file__).resolve().parents[2]
ANSWER_KEYS = ["span_start", "span_end", "span_text", "input_text", "turn_id"]


def columns(items, keys):
    return {k: [item[k] for item in items] for k in keys}


def hf_row(doc):
    return {
        "id": doc["id"],
        "source": doc["source"],
        "story": doc["story"],
        "questions": columns(doc["questions"], ["input_text", "turn_id"]),
        "answers": columns(doc["answers"], ANSWER_KEYS),
        "additional_answers": {
            k: columns(v, ANSWER_KEYS) for k, v in doc["additional_answers"].items()
        },
    }


def answer_type():
    return pa.struct(
        [
            ("span_start", pa.list_(pa.int32())),
            ("span_end", pa.list_(pa.int32())),
            ("span_text", pa.list_(pa.string())),
            ("input_text", pa.list_(pa.string())),
            ("turn_id", pa.list_(pa.int32())),
        ]
    )


SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("story", pa.string()),
        ("questions", pa.struct([("input_text", pa.list_(pa.string())), ("turn_id", pa.list_(pa.int32()))])),
        ("answers", answer_type()),
        ("additional_answers", pa.struct([(k, answer_type()) for k in "012"])),
    ]
)

docs = json.loads((ROOT / "data/coqa-fixture.json").read_text())["data"]
rows = [hf_row(d) for d in docs]
out = ROOT / "tests/data"
pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out / "eval-coqa-fixture-hf.parquet")
with open(out / "eval-coqa-fixture-hf.jsonl", "w") as f:
    for r in rows[:2]:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
