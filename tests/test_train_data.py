"""Training data: the template, HH-RLHF dialogue splitting, and clear errors for bad files."""

import gzip
import json
from pathlib import Path

import pytest

from train.data import (
    DataError,
    fit_length,
    format_prompt,
    held_out,
    keep_ends,
    load_examples,
    load_pairs,
    load_response_sets,
    split_by_prompt,
    split_hh,
)

EXAMPLES = Path(__file__).parent.parent / "examples" / "data"


def write(tmp_path, text, name="data.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_hh_split_takes_the_shared_dialogue_up_to_the_last_assistant_turn():
    shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I bake bread?\n\nAssistant:"
    prompt, chosen, rejected = split_hh(shared + " Mix flour and water.", shared + " No.")
    assert prompt == shared.strip()
    assert (chosen, rejected) == ("Mix flour and water.", "No.")


def test_hh_rows_load_as_templated_pairs(tmp_path):
    row = {"chosen": "\n\nHuman: Is it safe?\n\nAssistant: Yes, with care.",
           "rejected": "\n\nHuman: Is it safe?\n\nAssistant: Who cares."}
    [pair] = load_pairs(write(tmp_path, json.dumps(row) + "\n"))
    assert pair.prompt == format_prompt("Is it safe?")
    assert (pair.chosen, pair.rejected) == ("Yes, with care.", "Who cares.")


def test_the_vendored_hh_file_splits_into_nonempty_pairs():
    pairs = load_pairs(EXAMPLES / "hh_rlhf_harmless.jsonl.gz")
    assert len(pairs) > 2000
    assert all(p.chosen and p.rejected and p.prompt.startswith("Instruction:\n") for p in pairs)
    with gzip.open(EXAMPLES / "hh_rlhf_harmless.jsonl.gz", "rt") as f:
        first = json.loads(f.readline())
    # Re-joining prompt and response gives back the original dialogue.
    assert first["chosen"].strip().endswith(pairs[0].chosen)


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "p", "chosen": "a"}\n', "data.jsonl:1: missing field 'rejected'"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\nnot json\n', "data.jsonl:2: not a JSON line"),
    ('{"prompt": "p", "chosen": 3, "rejected": "b"}\n', "data.jsonl:1: field 'chosen' must be a string"),
    ('{"prompt": " ", "chosen": "a", "rejected": "b"}\n', "data.jsonl:1: field 'prompt' is empty"),
    ('[1, 2]\n', "data.jsonl:1: expected a JSON object"),
    ('\n\n', "data.jsonl: the file has no rows"),
    ('{"chosen": "a", "rejected": "b"}\n', "data.jsonl:1: missing field 'prompt'"),
])
def test_bad_pair_files_name_the_line_and_field(tmp_path, text, message):
    with pytest.raises(DataError) as info:
        load_pairs(write(tmp_path, text))
    assert message in str(info.value)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p"}, "missing field 'completion'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "field 'messages' must be a list of at least two"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}, "end with an assistant"),
])
def test_bad_instruction_files_name_the_line_and_field(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load_examples(write(tmp_path, json.dumps(row) + "\n"))


@pytest.mark.parametrize("row, message", [
    ({"responses": ["a", "b"]}, "data.jsonl:1: missing field 'prompt'"),
    ({"prompt": "p", "responses": ["a"]}, "data.jsonl:1: field 'responses' must be a list of at least two"),
    ({"prompt": "p", "responses": "ab"}, "data.jsonl:1: field 'responses' must be a list of at least two"),
    ({"prompt": "p", "responses": ["a", " "]}, "data.jsonl:1: field 'responses'[1] must be a non-empty string"),
])
def test_bad_response_set_files_name_the_line_and_field(tmp_path, row, message):
    with pytest.raises(DataError) as info:
        load_response_sets(write(tmp_path, json.dumps(row) + "\n"))
    assert message in str(info.value)


def test_response_sets_use_the_template(tmp_path):
    sets = load_response_sets(write(tmp_path, json.dumps({"prompt": "Say hi", "responses": [" hi", "hello "]}) + "\n"))
    assert sets[0].prompt == format_prompt("Say hi") and sets[0].responses == ("hi", "hello")


def test_instruction_formats_all_use_the_template(tmp_path):
    rows = [{"prompt": "Say hi", "completion": "hi"},
            {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
            {"instruction": "Say", "instances": [{"input": "hi", "output": "hi"}]}]
    examples = load_examples(write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows)))
    assert [e.prompt for e in examples] == [format_prompt("Say hi")] * 2 + [format_prompt("Say\n\nhi")]
    assert {e.completion for e in examples} == {"hi"}


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_pairs(tmp_path / "nope.jsonl")


def test_rows_whose_prompt_fills_max_length_are_left_out_and_long_responses_counted(tmp_path, tiny_text_dir,
                                                                                   caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_dir)
    rows = [{"prompt": "p", "chosen": "a" * 80, "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "p" * 80, "chosen": "a", "rejected": "b"}]
    pairs = load_pairs(write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows)))
    kept, truncated = fit_length(pairs, tokenizer, 64, ("chosen", "rejected"))
    assert kept == pairs[:2] and truncated == 1
    assert "data.jsonl:3: field 'prompt' is" in caplog.text and "left out 1 row(s)" in caplog.text
    with pytest.raises(DataError, match=r"data.jsonl:3: field 'prompt' is \d+ tokens.*no row fits"):
        fit_length(pairs[2:], tokenizer, 64, ("chosen", "rejected"))


def test_reward_pairs_keep_their_ends_and_lose_the_prompts_start(tmp_path, tiny_text_dir):
    """The reward head reads the last token: a long prompt loses its start (the response and its end
    stay whole), a response that cannot fit with any context leaves the pair out."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_dir)
    rows = [{"prompt": "p" * 30 + " the question?", "chosen": "yes", "rejected": "no"},
            {"prompt": "q", "chosen": "a" * 60, "rejected": "b"}, {"prompt": "r", "chosen": "c", "rejected": "d"}]
    pairs = load_pairs(write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows)))
    kept, cut, dropped = keep_ends(pairs, tokenizer, 40)
    assert (cut, dropped) == (1, 1) and kept[1] == pairs[2]
    assert kept[0].prompt.endswith(" the question?\n\nResponse:\n") and pairs[0].prompt.startswith("Instruction")
    assert not kept[0].prompt.startswith("Instruction")
    assert (kept[0].chosen, kept[0].rejected) == ("yes", "no")
    for pair in kept:
        for response in (pair.chosen, pair.rejected):
            assert len(tokenizer(pair.prompt + response)["input_ids"]) + 1 <= 40
    with pytest.raises(DataError, match="no pair's responses fit"):
        keep_ends(pairs[1:2], tokenizer, 40)


def test_pairs_are_held_out_by_prompt_whatever_else_is_left_out():
    """The split depends on each prompt alone: filtering pairs (for length, as one trainer does and
    another does not) keeps every remaining pair on its side, so a reward model and a DPO policy are
    compared on the same held-out prompts; a prompt's pairs stay together; the share is the fraction."""
    from train.data import Pair

    pairs = [Pair(f"prompt {i // 2}", f"good {i}", f"bad {i}", f"f:{i}") for i in range(4000)]
    train, evaluation = split_by_prompt(pairs, 0.2, seed=1)
    assert len(train) + len(evaluation) == len(pairs) and not {p.prompt for p in train} & {p.prompt for p in evaluation}
    assert abs(len(evaluation) / len(pairs) - 0.2) < 0.03
    kept = pairs[::3]  # another trainer leaves some pairs out
    assert split_by_prompt(kept, 0.2, seed=1) == ([p for p in kept if p in train], [p for p in kept if p in evaluation])
    assert split_by_prompt(pairs, 0.2, seed=2)[1] != evaluation
    few = pairs[:4]  # two prompts: the hash may hold out neither; a seeded draw of whole prompts then
    small_train, small_eval = split_by_prompt(few, 0.3, seed=0)
    assert small_train and small_eval and {p.prompt for p in small_train}.isdisjoint(p.prompt for p in small_eval)


def test_held_out_split_is_seeded_and_disjoint():
    rows = list(range(50))
    train, evaluation = held_out(rows, 0.2, seed=3)
    assert held_out(rows, 0.2, seed=3) == (train, evaluation)
    assert len(evaluation) == 10 and sorted(train + evaluation) == rows


def test_held_out_keeps_each_group_on_one_side():
    rows = [(g, i) for g in range(12) for i in range(g % 4 + 1)]  # groups of 1 to 4 rows
    for seed in range(5):
        train, evaluation = held_out(rows, 0.25, seed=seed, group=lambda r: r[0])
        assert not {g for g, _ in train} & {g for g, _ in evaluation}
        assert sorted(train + evaluation) == sorted(rows)
        assert 0.25 * len(rows) <= len(evaluation) < 0.25 * len(rows) + 4
    one_group = [(0, i) for i in range(6)]
    assert held_out(one_group, 0.5, seed=0, group=lambda r: r[0]) == (one_group, [])  # nothing to hold out


def test_hh_pairs_with_an_empty_final_reply_are_skipped_and_reported(tmp_path, caplog):
    rows = [{"chosen": "\n\nHuman: a?\n\nAssistant: ", "rejected": "\n\nHuman: a?\n\nAssistant: b"},
            {"chosen": "\n\nHuman: c?\n\nAssistant: d", "rejected": "\n\nHuman: c?\n\nAssistant: e"}]
    pairs = load_pairs(write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows)))
    assert [p.chosen for p in pairs] == ["d"]
    assert "skipped 1 dialogue pair(s) whose final reply is empty (lines 1)" in caplog.text


def test_non_utf8_and_cut_off_gzip_data_are_named_by_file_and_line(tmp_path):
    import gzip

    from steer.jsonl import DataError, read_jsonl

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8 text"):
        list(read_jsonl(latin))
    data = gzip.compress(b"".join(b'{"prompt": "row %d"}\n' % i for i in range(2000)))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: the compressed file is cut off or damaged"):
        list(read_jsonl(cut))
    huge = tmp_path / "huge.jsonl"  # refused as it is read, before any tokenizer sees 20 MB of text
    huge.write_text('{"prompt": "a"}\n{"prompt": "' + "x" * 20_000_000 + '"}\n')
    rows = read_jsonl(huge)
    assert next(rows)[0] == 1
    with pytest.raises(DataError, match=r"huge\.jsonl:2: the line is longer than 4 MiB"):
        next(rows)


def test_a_tokenizer_read_once_is_handed_out_as_independent_copies(tiny_text_dir, tmp_path, monkeypatch):
    """The same tokenizer files (a trained model's copy of its base model's included) are read once per
    process; every caller gets its own copy, named after its own directory."""
    import train.common as common

    monkeypatch.setattr(common, "_TOKENIZERS", {})
    reads = []
    read = common._read_tokenizer
    monkeypatch.setattr(common, "_read_tokenizer", lambda directory: reads.append(directory) or read(directory))
    first = common.load_tokenizer(tiny_text_dir)
    first.save_pretrained(tmp_path / "trained")  # (as a trainer saves it beside its model)
    first.padding_side = "left" if first.padding_side == "right" else "right"
    second = common.load_tokenizer(tmp_path / "trained")
    third = common.load_tokenizer(tiny_text_dir)
    assert reads == [tiny_text_dir] and len({id(first), id(second), id(third)}) == 3
    assert third.padding_side != first.padding_side  # a caller's change stays its own
    assert second.name_or_path == str(tmp_path / "trained") and third.name_or_path == str(tiny_text_dir)
    assert second("add 2 and 3")["input_ids"] == third("add 2 and 3")["input_ids"]
    (tmp_path / "trained" / "tokenizer.json").write_text((tmp_path / "trained" / "tokenizer.json").read_text() + " ")
    common.load_tokenizer(tmp_path / "trained")  # other content: read anew
    assert reads == [tiny_text_dir, tmp_path / "trained"]
