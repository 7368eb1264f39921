"""The question-answering family: SQuAD JSON and JSONL readers, windowed features and answer positions, window
logits back to text, SQuAD's exact match / F1 (official normalisation, SQuAD 2.0 splits and thresholds), the
and one-line data errors."""
import json

import numpy as np
import pytest

from fastroberta.data.tokenizer import special_ids, train_tokenizer
from fastroberta.tasks.errors import DataError
from fastroberta.tasks.qa import QAExample, QAFeatures, answer_tokens, context_windows, qa_features, read_qa
from fastroberta.tasks.qa_eval import (Answer, answer_texts, exact_match, f1, no_answer_scores, normalize_answer,
                                       postprocess_qa, squad_metrics, write_predictions)
from fastroberta.tasks.readers import write_jsonl
from fastroberta.tasks.swapped_words import swapped_span_questions

CONTEXT_A = "The cat sat on the mat. It was a sunny day in Verona."
CONTEXT_B = "Romeo loves Juliet."
SQUAD = {"version": "v2.0", "data": [
    {"title": "t", "paragraphs": [
        {"context": CONTEXT_A, "qas": [
            {"id": "q1", "question": "Where did the cat sit?", "is_impossible": False,
             "answers": [{"text": "on the mat", "answer_start": 12}, {"text": "the mat", "answer_start": 15}]},
            {"id": "q2", "question": "Who owns the cat?", "is_impossible": True, "answers": [],
             "plausible_answers": [{"text": "Verona", "answer_start": 46}]}]},
        {"context": CONTEXT_B, "qas": [
            {"id": "q3", "question": "Whom does Romeo love?", "answers": [{"text": "Juliet", "answer_start": 12}]}]}]}]}
JSONL = [
    {"id": "q1", "context": CONTEXT_A, "question": "Where did the cat sit?",
     "answers": {"text": ["on the mat", "the mat"], "answer_start": [12, 15]}},
    {"id": "q2", "context": CONTEXT_A, "question": "Who owns the cat?", "answers": {"text": [], "answer_start": []}},
    {"id": "q3", "context": CONTEXT_B, "question": "Whom does Romeo love?",
     "answers": {"text": ["Juliet"], "answer_start": [12]}},
]


def _write_json(path, doc):
    path.write_text(json.dumps(doc), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    rows = swapped_span_questions(n_train=300, n_validation=10, n_test=10)
    tok = train_tokenizer([r["context"] for r in rows["train"]] + [CONTEXT_A, CONTEXT_B], 400)
    return tok, special_ids(tok)


def test_json_and_jsonl_give_the_same_examples(tmp_path):
    from_json = read_qa(_write_json(tmp_path / "d.json", SQUAD))
    path = str(tmp_path / "d.jsonl")
    write_jsonl(JSONL, path)
    from_jsonl = read_qa(path)
    key = lambda e: (e.id, e.question, e.context, e.answers, e.is_impossible)  # noqa: E731
    assert [key(e) for e in from_json] == [key(e) for e in from_jsonl]
    assert [e.is_impossible for e in from_json] == [False, True, False]
    assert from_json[0].answers == [("on the mat", 12), ("the mat", 15)]
    assert from_json[1].where == "data[0].paragraphs[0].qas[1]" and from_jsonl[1].where == "line 2"


def test_a_test_split_may_lack_answers(tmp_path):
    path = str(tmp_path / "t.jsonl")
    write_jsonl([{k: v for k, v in r.items() if k != "answers"} for r in JSONL], path)
    examples = read_qa(path, "test", need_answers=False)
    assert [e.answers for e in examples] == [None, None, None]
    assert not any(e.is_impossible for e in examples)
    with pytest.raises(DataError, match=r"line 1: no answers \(field 'answers'\)"):
        read_qa(path, "train")


def _squad_with(change):
    doc = json.loads(json.dumps(SQUAD))
    change(doc["data"][0]["paragraphs"][0])
    return doc


@pytest.mark.parametrize("change, message", [
    (lambda p: p["qas"][0]["answers"][1].update(answer_start=14),
     r"d\.json data\[0\]\.paragraphs\[0\]\.qas\[0\]: answer 1 'the mat' does not match the context at answer_start "
     r"14 \(the context there reads ' the ma'\)"),
    (lambda p: p.pop("context"), r"d\.json data\[0\]\.paragraphs\[0\]: no context \(field 'context'"),
    (lambda p: p["qas"][0].update(question="  "), r"qas\[0\]: no question \(field 'question'"),
    (lambda p: p["qas"][1].update(id="q1"),
     r"qas\[1\]: id 'q1' repeats the one at data\[0\]\.paragraphs\[0\]\.qas\[0\]"),
    (lambda p: p["qas"][1].update(answers=[{"text": "Verona", "answer_start": 46}]),
     r"qas\[1\]: is_impossible is true but the question has answers"),
    (lambda p: p["qas"][0]["answers"][0].update(answer_start="8"), r"answer 0 has answer_start '8'"),
    (lambda p: p["qas"][0]["answers"][0].update(answer_start=500),
     r"answer 0 'on the mat' does not match the context at answer_start 500"),
    (lambda p: p["qas"][0].pop("id"), r"qas\[0\]: no id \(field 'id'\)"),
])
def test_json_errors_are_one_line_naming_file_record_and_field(tmp_path, change, message):
    path = _write_json(tmp_path / "d.json", _squad_with(change))
    with pytest.raises(DataError, match=message) as err:
        read_qa(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(path)


@pytest.mark.parametrize("row, message", [
    ({"id": "x", "question": "Who?", "answers": {"text": [], "answer_start": []}}, r"line 2: no context"),
    ({"id": "x", "context": "abc", "question": "Who?", "answers": {"text": ["b"], "answer_start": [0]}},
     r"line 2: answer 0 'b' does not match the context at answer_start 0 \(the context there reads 'a'\)"),
    ({"id": "x", "context": "abc", "question": "Who?", "answers": {"text": ["b"], "answer_start": []}},
     r"line 2: 'answers' must be \{\"text\": \[...\], \"answer_start\": \[...\]\} with one start per text"),
    ({"id": "x", "context": "abc", "answers": {"text": [], "answer_start": []}}, r"line 2: no question"),
    ({"id": "x", "context": "abc", "question": "Who?", "answers": {"text": [""], "answer_start": [0]}},
     r"line 2: answer 0 has no text"),
])
def test_jsonl_errors_are_one_line(tmp_path, row, message):
    path = str(tmp_path / "d.jsonl")
    write_jsonl([JSONL[0], row], path)
    with pytest.raises(DataError, match=message) as err:
        read_qa(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(path)


def test_file_level_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{\"data\": [", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json is not valid JSON \(line 1\)"):
        read_qa(str(bad))
    with pytest.raises(DataError, match=r"no 'data' list"):
        read_qa(_write_json(tmp_path / "x.json", {"version": "1.1"}))
    with pytest.raises(DataError, match=r"--validation .*missing\.json' does not exist"):
        read_qa(str(tmp_path / "missing.json"), "validation")
    with pytest.raises(DataError, match=r"unknown format \.csv; question answering reads SQuAD \.json or \.jsonl"):
        (tmp_path / "a.csv").write_text("x\n")
        read_qa(str(tmp_path / "a.csv"))
    with pytest.raises(DataError, match=r"holds no questions"):
        read_qa(_write_json(tmp_path / "e.json", {"data": []}))


def test_context_windows_overlap_by_the_stride():
    assert context_windows(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert context_windows(11, 4, 1) == [(0, 4), (3, 7), (6, 10), (9, 11)]
    assert context_windows(3, 4, 2) == [(0, 3)]
    assert context_windows(0, 4, 2) == [(0, 0)]


def test_answer_tokens_from_character_offsets():
    offsets = [(0, 5), (6, 11), (11, 12), (13, 15)]          # "Hello world. Hi"
    assert answer_tokens(offsets, 6, 11) == (1, 1)           # "world"
    assert answer_tokens(offsets, 5, 12) == (1, 2)           # " world." (the space is not a token's)
    assert answer_tokens(offsets, 2, 8) == (0, 1)            # "llo wo": tokens cover a wider span
    assert answer_tokens(offsets[2:], 6, 11) is None         # starts before the window
    assert answer_tokens(offsets[:1], 0, 11) is None         # runs past the window (cut)
    assert answer_tokens([], 0, 1) is None


def _long_example():
    words = [f"w{i}" for i in range(60)]
    context = " ".join(words)
    answer = " ".join(words[20:24])
    return QAExample("long", "Which words?", context, [(answer, context.index(answer))], "line 1")


def test_windows_and_answer_positions(tokenizer):
    tok, special = tokenizer
    example = _long_example()
    impossible = QAExample("none", example.question, example.context, [], "line 2")
    max_seq_len, stride = 40, 12
    features = qa_features([example, impossible], tok, special, max_seq_len=max_seq_len, doc_stride=stride,
                           max_question_len=8)
    question = tok.encode("Which words?", add_special_tokens=False).ids
    context = tok.encode(example.context, add_special_tokens=False)
    head = [special["bos"]] + question + [special["eos"]] * 2
    mine = [f for f, n in enumerate(features.example_index) if n == 0]
    assert len(mine) > 2 and [n for n in features.example_index if n == 1] == [1] * len(mine)
    windows, contained, cut = [], 0, 0
    text, start = example.answers[0]
    for f in mine:
        ids, offsets = features.input_ids[f], features.offsets[f]
        assert len(ids) <= max_seq_len and ids[:len(head)] == head and ids[-1] == special["eos"]
        assert (offsets[:len(head)] == -1).all() and (offsets[-1] == -1).all()
        window = ids[len(head):-1]
        windows.append(window)
        first_char, last_char = offsets[len(head)][0], offsets[-2][1]
        s, e = features.start_positions[f], features.end_positions[f]
        if first_char <= start and start + len(text) <= last_char:
            contained += 1
            assert example.context[offsets[s][0]:offsets[e][1]] == text
        else:
            cut += first_char <= start < last_char or first_char < start + len(text) <= last_char
            assert s == e == 0
    assert contained >= 1 and cut >= 1  # the answer is whole in some window and cut at the edge of another
    # Together the windows are the context, consecutive ones sharing `stride` tokens.
    assert windows[0] == context.ids[:len(windows[0])]
    for a, b in zip(windows, windows[1:]):
        assert a[-stride:] == b[:stride]
    assert windows[-1] == context.ids[-len(windows[-1]):]
    assert all(features.start_positions[f] == features.end_positions[f] == 0
               for f, n in enumerate(features.example_index) if n == 1)


def test_an_answer_across_a_window_boundary_is_found_in_the_overlap(tokenizer):
    tok, special = tokenizer
    example = _long_example()
    text, start = example.answers[0]
    context = tok.encode(example.context, add_special_tokens=False)
    first_token = next(i for i, (_, b) in enumerate(context.offsets) if b > start)
    question_len = len(tok.encode(example.question, add_special_tokens=False).ids)
    budget = first_token + 3                       # window 0 ends three tokens into the answer
    stride = 5                                     # window 1 starts two tokens before it
    features = qa_features([example], tok, special, max_seq_len=budget + question_len + 4, doc_stride=stride,
                           max_question_len=question_len)
    assert features.start_positions[0] == features.end_positions[0] == 0
    head = question_len + 3
    s, e = features.start_positions[1], features.end_positions[1]
    assert s > 0 and example.context[features.offsets[1][s][0]:features.offsets[1][e][1]] == text
    assert s - head == 2 and e - s + 1 > 3


def test_long_questions_are_cut_and_a_stride_too_large_is_refused(tokenizer):
    tok, special = tokenizer
    example = QAExample("q", "word " * 80, "short context", [("short", 0)], "line 1")
    features = qa_features([example], tok, special, max_seq_len=96, doc_stride=8, max_question_len=10)
    assert features.input_ids[0][11:13] == [special["eos"]] * 2
    from fastroberta.training.errors import ConfigError
    with pytest.raises(ConfigError, match="--max-seq-len 100 leaves at most 32 context tokens .* --doc-stride 40"):
        qa_features([example], tok, special, max_seq_len=100, doc_stride=40, max_question_len=64)


def _hand_features():
    """Two examples: "a" over two windows, "b" in one. Offsets: tokens 0-1 are special / question."""
    context = "alpha beta gamma delta"
    examples = [QAExample("a", "?", context, [("gamma", 11)], "1"), QAExample("b", "?", "zeta eta", [], "2")]
    o = lambda *spans: np.array([(-1, -1), (-1, -1), *spans, (-1, -1)], np.int32)  # noqa: E731
    offsets = [o((0, 5), (6, 10)), o((6, 10), (11, 16), (17, 22)), o((0, 4), (5, 8))]
    features = QAFeatures([[0] * len(x) for x in offsets], offsets, np.array([0, 0, 1]), None, None)
    return examples, features


def test_postprocess_picks_the_best_valid_span_across_windows():
    examples, features = _hand_features()
    neg = -10.0
    start = [np.array([1.0, 9.0, 2.0, 1.0, neg]),           # window 0: the question token (1) is not context
             np.array([0.5, neg, 1.0, 3.0, 2.5, neg, 7.0]),  # window 1: 5 is past the sequence (padding)
             np.array([4.0, neg, 1.0, 0.0, neg])]
    end = [np.array([1.0, 9.0, 1.0, 2.0, neg]),
           np.array([2.0, neg, 0.0, 2.5, 3.0, neg, 7.0]),
           np.array([3.0, neg, 0.0, 1.0, neg])]
    best = postprocess_qa(examples, features, start, end, n_best=20, max_answer_len=30)
    # a: window 0 best is (2, 3) "alpha beta" = 2 + 2 = 4; window 1 (3, 4) "gamma delta" = 3 + 3 = 6.
    assert best["a"].text == "gamma delta" and best["a"].score == 6.0
    assert best["a"].null_score == 2.0                       # min(1 + 1, 0.5 + 2)
    assert best["b"] == Answer("zeta eta", 2.0, 7.0)         # (2, 3) = 1 + 1 beats (2, 2) = 1 and (3, 3) = 1
    # One token at most: "gamma" (3 + 2.5) and "delta" (2.5 + 3) tie; the first found (higher start) stays.
    short = postprocess_qa(examples, features, start, end, n_best=20, max_answer_len=1)
    assert short["a"].text == "gamma" and short["a"].score == 5.5
    # n_best=1: only the top start and the top end of each window are paired: window 0's and window 2's top
    # starts (1 and 0) are not context, window 1's (3) pairs with its top end (4).
    top = postprocess_qa(examples, features, start, end, n_best=1, max_answer_len=30)
    assert top["a"].text == "gamma delta" and top["b"].text == ""
    assert top["b"].score == float("-inf")
    scores = no_answer_scores(best)
    assert scores == {"a": 2.0 - 6.0, "b": 7.0 - 2.0}
    assert answer_texts(best) == {"a": "gamma delta", "b": "zeta eta"}
    assert answer_texts(best, scores, threshold=0.0) == {"a": "gamma delta", "b": ""}
    assert answer_texts(best, scores, threshold=5.0) == {"a": "gamma delta", "b": "zeta eta"}


@pytest.mark.parametrize("text, normalized", [
    ("The  Cat!", "cat"),
    ("an apple", "apple"),
    ("A-team's theatre, the end.", "ateams theatre end"),   # articles only as whole words
    ("“Quoted” — ¿qué?", "“quoted” — ¿qué"),   # the official script strips ASCII punctuation only
    ("  Anne\tThe\nGreat  ", "anne great"),
    ("", ""),
])
def test_official_normalisation(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_and_f1_by_hand():
    assert exact_match("The Cat!", "cat") == 1.0 and exact_match("cats", "cat") == 0.0
    assert f1("the cat sat", "cat sat on a mat") == pytest.approx(2 * 1 * 0.5 / 1.5)   # p 2/2, r 2/4
    assert f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)                   # common: cat, dog
    assert f1("", "") == 1.0 and f1("the", "") == 1.0 and f1("a cat", "") == 0.0
    assert f1("fish", "cat") == 0.0


def test_squad_v1_metrics_by_hand():
    examples = [QAExample("1", "?", "c", [("the mat", 0), ("on the mat", 0)], ""),
                QAExample("2", "?", "c", [("Juliet", 0)], ""),
                QAExample("3", "?", "c", [("red car", 0)], "")]
    metrics = squad_metrics(examples, {"1": "on mat", "2": "juliet.", "3": "a blue car"})
    # 1: exact vs "on the mat" -> 1; 2: exact; 3: "blue car" vs "red car": p 1/2, r 1/2 -> 0.5.
    assert metrics == {"exact": pytest.approx(200 / 3), "f1": pytest.approx(250 / 3), "total": 3}


def test_squad_v2_metrics_and_thresholds_by_hand():
    examples = [QAExample("h1", "?", "c", [("cat", 0)], ""), QAExample("h2", "?", "c", [("big dog", 0)], ""),
                QAExample("n1", "?", "c", [], ""), QAExample("n2", "?", "c", [], "")]
    spans = {"h1": "cat", "h2": "dog", "n1": "fish", "n2": "bird"}
    scores = {"h1": -2.0, "h2": 1.0, "n1": 3.0, "n2": -1.0}
    m = squad_metrics(examples, spans, scores)
    # At threshold 0: h1 "cat" (1, 1), h2 "" (0, 0), n1 "" (1, 1), n2 "bird" (0, 0).
    assert m["exact"] == 50.0 and m["f1"] == 50.0 and m["total"] == 4
    assert (m["HasAns_exact"], m["HasAns_f1"], m["HasAns_total"]) == (50.0, 50.0, 2)
    assert (m["NoAns_exact"], m["NoAns_f1"], m["NoAns_total"]) == (50.0, 50.0, 2)
    # All unanswered: 2 (n1, n2). By rising score: h1 +1 -> 3 (thresh -2), n2 -1 -> 2, h2 +0 exact / +2/3 F1,
    # n1 -1. Exact peaks at 3 after h1; F1 at 3 after h1 too (2 + 2/3 < 3).
    assert m["best_exact"] == 75.0 and m["best_exact_thresh"] == -2.0
    assert m["best_f1"] == 75.0 and m["best_f1_thresh"] == -2.0
    scores["n2"] = 2.0   # now h2 comes before n2: F1 peaks at 3 + 2/3 at thresh 1.0, exact stays at -2.0
    m = squad_metrics(examples, spans, scores)
    assert m["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 4) and m["best_f1_thresh"] == 1.0
    assert m["best_exact"] == 75.0 and m["best_exact_thresh"] == -2.0


def test_predictions_json_is_the_official_format(tmp_path):
    path = tmp_path / "predictions.json"
    write_predictions({"q1": "on the mat", "q2": "", "q3": "Juliet’s"}, str(path))
    assert json.loads(path.read_text(encoding="utf-8")) == {"q1": "on the mat", "q2": "", "q3": "Juliet’s"}
