"""The hf: data sources of fastroberta-finetune's task families (hf:squad, hf:squad_v2, hf:race:all,
hf:swag:regular, hf:conll2003) through a stand-in ``datasets`` module: tiny in-memory splits with the real
datasets' columns and features, so the mapping is tested without the package or a network."""
import re
import shlex
import sys
import types
from pathlib import Path

import pytest

from fastroberta.tasks.errors import DataError
from fastroberta.tasks.multiple_choice import read_choices
from fastroberta.tasks.qa import read_qa
from fastroberta.tasks.token_tags import read_tags

README = Path(__file__).resolve().parent.parent / "README.md"


class ClassLabel:
    def __init__(self, names):
        self.names = list(names)


class Sequence:
    def __init__(self, feature):
        self.feature = feature


class Value:
    def __init__(self, dtype):
        self.dtype = dtype


class Dataset:
    """What the readers use of ``datasets.Dataset``: iteration over row dicts, ``column_names``, ``features``."""

    def __init__(self, rows, features):
        self.rows, self.features, self.column_names = rows, features, list(features)

    def __iter__(self):
        return iter(dict(r) for r in self.rows)

    def __len__(self):
        return len(self.rows)


SQUAD_FEATURES = {"id": Value("string"), "title": Value("string"), "context": Value("string"),
                  "question": Value("string"),
                  "answers": Sequence({"text": Value("string"), "answer_start": Value("int32")})}
CONTEXT = "Architecturally, the school has a Catholic character. Atop the Main Building's gold dome is a statue."
SQUAD = [{"id": "5733be284776f41900661182", "title": "University_of_Notre_Dame", "context": CONTEXT,
          "question": "What sits on top of the Main Building?", "answers": {"text": ["a statue"],
                                                                             "answer_start": [92]}},
         {"id": "5733be284776f4190066117f", "title": "University_of_Notre_Dame", "context": CONTEXT,
          "question": "What character does the school have?",
          "answers": {"text": ["Catholic", "a Catholic character"], "answer_start": [34, 32]}}]
SQUAD_V2 = SQUAD + [{"id": "5a8d7bf7df8bba001a0f9ab1", "title": "University_of_Notre_Dame", "context": CONTEXT,
                     "question": "What is below the dome?", "answers": {"text": [], "answer_start": []}}]

RACE_FEATURES = {"example_id": Value("string"), "article": Value("string"), "answer": Value("string"),
                 "question": Value("string"), "options": Sequence(Value("string"))}
RACE = [{"example_id": "high132.txt", "article": "Tom has a red bike. He rides it to school.",
         "answer": "B", "question": "What colour is Tom's bike?", "options": ["blue", "red", "green", "black"]},
        {"example_id": "high132.txt", "article": "Tom has a red bike. He rides it to school.",
         "answer": "D", "question": "Tom rides his bike to _ .", "options": ["work", "the park", "town", "school"]}]

SWAG_FEATURES = {k: Value("string") for k in ("video-id", "fold-ind", "startphrase", "sent1", "sent2",
                                               "gold-source", "ending0", "ending1", "ending2", "ending3")}
SWAG_FEATURES["label"] = ClassLabel(["0", "1", "2", "3"])


def _swag(label, gold="gold"):
    return {"video-id": "anetv_jkn6uvmqwh4", "fold-ind": "3416",
            "startphrase": "Members of the procession walk down the street. A drum line",
            "sent1": "Members of the procession walk down the street.", "sent2": "A drum line",
            "gold-source": gold, "ending0": "passes by playing their instruments.", "ending1": "has heard the noise.",
            "ending2": "arrives and they're outside dancing.", "ending3": "turns the lead singer.", "label": label}


CONLL_NAMES = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
CONLL_FEATURES = {"id": Value("string"), "tokens": Sequence(Value("string")),
                  "pos_tags": Sequence(ClassLabel([f"pos{i}" for i in range(47)])),
                  "chunk_tags": Sequence(ClassLabel([f"chunk{i}" for i in range(23)])),
                  "ner_tags": Sequence(ClassLabel(CONLL_NAMES))}
CONLL = [{"id": "0", "tokens": ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
          "pos_tags": [22, 42, 16, 21, 35, 37, 16, 21, 7], "chunk_tags": [11, 21, 11, 12, 21, 22, 11, 12, 0],
          "ner_tags": [3, 0, 7, 0, 0, 0, 7, 0, 0]},
         {"id": "1", "tokens": ["Peter", "Blackburn"], "pos_tags": [22, 22], "chunk_tags": [11, 12],
          "ner_tags": [1, 2]}]
CONLL_TAGS = [["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"], ["B-PER", "I-PER"]]


def fake_datasets(tables):
    """A ``datasets`` module whose load_dataset serves ``tables[(path, config, split)] = (rows, features)`` and
    fails as the real one does for anything else; ``module.calls`` records what was asked."""
    module = types.ModuleType("datasets")
    module.calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        module.calls.append((path, name, split))
        if (path, name, split) not in tables:
            known = sorted(s for p, c, s in tables if (p, c) == (path, name))
            raise ValueError(f"Unknown split \"{split}\". Should be one of {known}.\nmore detail")
        rows, features = tables[path, name, split]
        return Dataset(rows, features)
    module.load_dataset = load_dataset
    return module


STANDARD = {("squad", None, "train"): (SQUAD, SQUAD_FEATURES), ("squad", None, "validation"): (SQUAD, SQUAD_FEATURES),
            ("squad_v2", None, "train"): (SQUAD_V2, SQUAD_FEATURES),
            ("squad_v2", None, "validation"): (SQUAD_V2, SQUAD_FEATURES),
            **{("race", "all", s): (RACE, RACE_FEATURES) for s in ("train", "validation", "test")},
            ("swag", "regular", "train"): ([_swag(0), _swag(2)], SWAG_FEATURES),
            ("swag", "regular", "validation"): ([_swag(1)], SWAG_FEATURES),
            ("swag", "regular", "test"): ([_swag(-1, "")], SWAG_FEATURES),
            **{("conll2003", None, s): (CONLL, CONLL_FEATURES) for s in ("train", "validation", "test")}}


@pytest.fixture
def datasets(monkeypatch):
    module = fake_datasets(dict(STANDARD))
    monkeypatch.setitem(sys.modules, "datasets", module)
    return module


def test_squad_and_squad_v2_rows_become_examples(datasets):
    train = read_qa("hf:squad", "train")
    assert [e.id for e in train] == [r["id"] for r in SQUAD]
    assert train[0].answers == [("a statue", 92)] and train[1].answers == [("Catholic", 34),
                                                                           ("a Catholic character", 32)]
    assert train[0].question == SQUAD[0]["question"] and train[0].context == CONTEXT
    v2 = read_qa("hf:squad_v2", "validation")
    assert [e.is_impossible for e in v2] == [False, False, True]
    assert datasets.calls == [("squad", None, "train"), ("squad_v2", None, "validation")]
    read_qa("hf:squad@validation", "train")  # @ names the split
    assert datasets.calls[-1] == ("squad", None, "validation")


def test_race_rows_become_four_choices_with_the_letter_as_label(datasets):
    split = read_choices("hf:race:all", "validation", form="race")
    assert datasets.calls == [("race", "all", "validation")]
    assert split.contexts == [RACE[0]["article"]] * 2 and split.labels == [1, 3]
    assert split.choices[0] == [f"What colour is Tom's bike? {o}" for o in RACE[0]["options"]]
    assert split.choices[1][3] == "Tom rides his bike to school ."  # the cloze blank filled
    assert read_choices("hf:race:all", "test", need_labels=False).labels == [1, 3]  # form told by the columns


def test_swag_rows_and_the_unlabelled_test_split(datasets):
    train = read_choices("hf:swag:regular", "train", form="swag")
    assert train.labels == [0, 2] and train.contexts[0] == _swag(0)["sent1"]
    assert train.choices[0] == [f"A drum line {_swag(0)[f'ending{i}']}" for i in range(4)]
    assert read_choices("hf:swag:regular", "test", need_labels=False).labels == [None]  # SWAG's -1
    with pytest.raises(DataError, match=r"hf:swag:regular@test row 0: no field 'label'"):
        read_choices("hf:swag:regular", "test", need_labels=True)


def test_conll2003_tag_ids_map_through_the_columns_class_names(datasets, monkeypatch):
    split = read_tags("hf:conll2003", "train")
    assert split.words == [r["tokens"] for r in CONLL] and split.tags == CONLL_TAGS
    assert split.places[1][1] == "hf:conll2003@train row 1 word 2"
    # The names come from the features, not from a list of CoNLL's: another order maps accordingly.
    names = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    rows = [{"tokens": ["Paris", "Hilton"], "ner_tags": [3, 4]}, {"tokens": ["in", "Paris"], "ner_tags": [0, 1]}]
    features = {"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names))}
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({("wnut", None, "train"): (rows, features)}))
    assert read_tags("hf:wnut", "train").tags == [["B-PER", "I-PER"], ["O", "B-LOC"]]


BAD = [
    ("squad", "hf:squad", 1, "answers", {"text": ["a statue"], "answer_start": [3]},
     r"hf:squad@train row 1: answer 0 'a statue' does not match the context at answer_start 3"),
    ("squad", "hf:squad", 0, "context", "", r"hf:squad@train row 0: no context \(field 'context'"),
    ("squad", "hf:squad", 1, "answers", {"text": ["x"]},
     r"hf:squad@train row 1: 'answers' must be \{\"text\": \[...\], \"answer_start\": \[...\]\}"),
    ("race", "hf:race:all", 1, "answer", "E", r"hf:race:all@train row 1: answer 'E' is out of range for 4 options"),
    ("race", "hf:race:all", 0, "options", ["only one"], r"hf:race:all@train row 0: 'options' must be a list"),
    ("swag", "hf:swag:regular", 1, "label", 7, r"hf:swag:regular@train row 1: label 7 is out of range"),
    ("ner", "hf:conll2003", 1, "ner_tags", [1, 12],
     r"hf:conll2003@train row 1 word 2: 'ner_tags' holds 12, not a tag id 0-8 \(O, B-PER"),
    ("ner", "hf:conll2003", 0, "tokens", [], r"hf:conll2003@train row 0: 'tokens' must be a non-empty list"),
]
READERS = {"squad": read_qa, "race": read_choices, "swag": read_choices, "ner": read_tags}


@pytest.mark.parametrize("family,spec,row,field,value,message", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_a_bad_row_is_one_line_naming_split_row_and_field(monkeypatch, family, spec, row, field, value, message):
    key = next(k for k in STANDARD if k[0] == spec[3:].split(":")[0] and k[2] == "train")
    rows, features = STANDARD[key]
    rows = [dict(r) for r in rows]
    rows[row][field] = value
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({key: (rows, features)}))
    with pytest.raises(DataError, match=message) as e:
        READERS[family](spec, "train")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec,reader", [("hf:squad", read_qa), ("hf:race:all", read_choices),
                                         ("hf:swag:regular", read_choices), ("hf:conll2003", read_tags)])
def test_without_datasets_or_with_an_unknown_split_one_line(monkeypatch, spec, reader):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as without the package
    with pytest.raises(DataError, match=re.escape(f"--train {spec}: reading Hugging Face datasets needs the "
                                                  "`datasets` package (pip install datasets)")):
        reader(spec, "train")
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(STANDARD))
    with pytest.raises(DataError, match=re.escape(f"--test {spec}@dev: loading split 'dev' failed: Unknown split")) \
            as e:
        reader(f"{spec}@dev", "test")
    assert "\n" not in str(e.value)


def _readme_commands():
    """The README's fastroberta-finetune commands that read hf: data for these families, as argument lists."""
    text = README.read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        if not line.strip().startswith("fastroberta-finetune "):
            continue
        argv = shlex.split(line.strip().split("  #")[0])
        if "--task" in argv:
            task = argv[argv.index("--task") + 1]
            if task in ("squad", "squad_v2", "race", "ner"):
                out[task] = argv[1:]
    return out


def test_the_readme_commands_read_their_data(datasets, tmp_path):
    """The README's SQuAD, RACE and CoNLL-2003 commands, with a tiny local model in place of --model: every flag
    exists and the hf: splits they name are read (no training: the settings and the data only)."""
    from fastroberta import finetune as ft
    from test_multiple_choice import tiny_model
    commands = _readme_commands()
    assert set(commands) == {"squad", "squad_v2", "race", "ner"}, commands
    model = tiny_model(tmp_path / "model", [CONTEXT, RACE[0]["article"], " ".join(CONLL[0]["tokens"])])
    for task, argv in commands.items():
        argv = list(argv)
        argv[argv.index("--model") + 1] = str(model)
        argv[argv.index("--output") + 1] = str(tmp_path / task)
        if "--max-seq-len" in argv:  # the tiny model's position table
            argv[argv.index("--max-seq-len") + 1] = "64"
        else:
            argv += ["--max-seq-len", "64", "--max-question-len", "16", "--doc-stride", "16"]
        args = ft.build_parser().parse_args(argv)
        s = ft.resolve_settings(args)
        tokenizer, special = ft.load_checked_tokenizer(s)
        data, names = ft.load_data(args, s, tokenizer, special)
        assert data["train"][1] is not None and data["validation"][1] is not None
        if task == "ner":
            assert names == CONLL_NAMES and set(data) == {"train", "validation", "test"}
        if task == "race":
            assert set(data) == {"train", "validation", "test"} and len(data["test"][0]) == len(RACE)
    assert ("race", "all", "test") in datasets.calls and ("conll2003", None, "validation") in datasets.calls


@pytest.mark.parametrize("task,train", [("race", "hf:race:all"), ("swag", "hf:swag:regular"),
                                        ("ner", "hf:conll2003"), ("squad", "hf:squad")])
def test_the_benchmark_tasks_default_to_their_hf_dataset(tmp_path, task, train):
    from fastroberta import finetune as ft
    from test_multiple_choice import tiny_model
    model = tiny_model(tmp_path / "model", [CONTEXT])
    args = ft.build_parser().parse_args(["--model", str(model), "--task", task, "--output", str(tmp_path / "o"),
                                         "--max-seq-len", "64"])
    ft.resolve_settings(args)
    assert (args.train, args.validation) == (train, train)


def test_finetune_ner_on_hf_conll2003_end_to_end(monkeypatch, tmp_path):
    """A short run on the stand-in hf:conll2003: the kept model predicts the test split by word."""
    import json
    from fastroberta import finetune as ft
    from test_multiple_choice import tiny_model
    model = tiny_model(tmp_path / "model", [" ".join(r["tokens"]) for r in CONLL] * 20)
    tables = {("conll2003", None, s): (CONLL * 8, CONLL_FEATURES) for s in ("train", "validation")}
    tables["conll2003", None, "test"] = (CONLL, CONLL_FEATURES)
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(tables))
    summary = ft.finetune(["--model", str(model), "--task", "ner", "--test", "hf:conll2003", "--precision", "fp32",
                           "--micro-batch-size", "8", "--global-batch-size", "8", "--steps", "2", "--lr", "1e-3",
                           "--max-seq-len", "32", "--no-progress", "--output", str(tmp_path / "run")])
    assert summary["step"] == 2 and summary["test"] is not None
    preds = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [p["tokens"] for p in preds] == [r["tokens"] for r in CONLL]
    assert [p["label"] for p in preds] == CONLL_TAGS


def test_a_script_dataset_under_datasets_4_names_the_way_out(monkeypatch):
    module = types.ModuleType("datasets")

    def load_dataset(path, name=None, split=None):
        raise RuntimeError("Dataset scripts are no longer supported, but found conll2003.py")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(DataError, match=r"--train hf:conll2003: loading split 'train' failed: Dataset scripts are no "
                                        r"longer supported, .*; name a copy stored as data files instead "
                                        r"\(hf:<owner>/<name>, e.g. hf:lhoestq/conll2003\)"):
        read_tags("hf:conll2003", "train")
