"""The knowledge battery: the scorer against a hand calculation, the loader's refusals, intervals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llamapro.eval import battery as B
from llamapro.eval.battery import BatteryError
from tests.tiny_models import tiny_model

from eval_support import char_tokenizer

DOCS = [  # contexts of different lengths, one with trailing spaces; 2-4 choices
    {"context": "Question: what is red?\nAnswer:", "choices": ["a fire truck", "grass"], "gold": 0},
    {"context": "The sky is  ", "choices": ["blue", "green and wet", "x"], "gold": 1},
    {"context": "Q: Tom ran. Why?\nA:", "choices": ["late", "he was late for the bus", "no", "fun"],
     "gold": 3},
    {"context": "", "choices": ["start", "begin again"], "gold": 0},
]


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    tok = char_tokenizer(tmp_path_factory.mktemp("tok"))
    return tiny_model("llama", num_layers=2, seed=3), tok


def _by_hand(model, tok, context: str, continuation: str) -> float:
    """One unpadded sequence, full logits: lm-eval's rule written out on its own."""
    while context.endswith(" "):  # trailing context spaces belong to the continuation
        context, continuation = context[:-1], " " + continuation
    ctx = tok(context, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(tok(context, add_special_tokens=False)["input_ids"]):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


@pytest.mark.parametrize("share", [False, True])
def test_scorer_equals_an_independent_calculation(model_tok, share):
    model, tok = model_tok
    reqs = B.requests_of(DOCS)
    got = B.score_requests(model, tok, reqs, batch_size=3, share_context=share)
    want = [_by_hand(model, tok, c, k) for c, k in reqs]
    assert got == pytest.approx(want, abs=2e-4)
    g = B.grade(DOCS, got)
    acc = norm = 0
    k = 0
    for d in DOCS:
        s = want[k:k + len(d["choices"])]
        k += len(d["choices"])
        acc += max(range(len(s)), key=s.__getitem__) == d["gold"]
        norm += max(range(len(s)), key=lambda j: s[j] / len(d["choices"][j])) == d["gold"]
    assert g["acc"] == acc / len(DOCS) and g["acc_norm"] == norm / len(DOCS)
    assert g["n"] == 4 and len(g["acc_items"]) == 4
    # the per-choice scores are different enough that ties cannot make this vacuous
    assert len(set(round(x, 3) for x in want)) == len(want)


def _write(tmp_path, rows) -> None:
    p = tmp_path / "PIQA" / "validation.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


GOOD = {"question": "open a jar", "options": "A. twist the lid\nB. lick it", "answer": "A. twist the lid"}


def test_loader_reads_a_good_file_and_builds_the_prompt(tmp_path):
    _write(tmp_path, [GOOD, {**GOOD, "answer": "B. lick it"}])
    docs = B.load_task("piqa", tmp_path)
    assert docs[0] == {"context": "Question: open a jar\nAnswer:",
                       "choices": ["twist the lid", "lick it"], "gold": 0}
    assert docs[1]["gold"] == 1
    assert len(B.load_task("piqa", tmp_path, limit=1)) == 1


@pytest.mark.parametrize("row, msg", [
    ("{not json", r"validation.jsonl:2: not valid JSON"),
    ({"question": "q", "options": "A. x\nB. y"}, r":2: missing or empty string field 'answer'"),
    ({**GOOD, "answer": "C. nothing"}, r":2: answer 'C. nothing' does not name one of the options"),
    ({**GOOD, "options": "A. only one"}, r":2: options must be"),
    ({**GOOD, "options": "B. x\nC. y"}, r":2: options must be"),
    ([1, 2], r":2: expected an object"),
])
def test_loader_refuses_a_malformed_file(tmp_path, row, msg):
    _write(tmp_path, [GOOD, row])
    with pytest.raises(BatteryError, match=msg):
        B.load_task("piqa", tmp_path)


def test_loader_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(BatteryError, match="does not exist"):
        B.load_task("piqa", tmp_path)
    with pytest.raises(BatteryError, match="unknown task 'trivia'"):
        B.load_task("trivia", tmp_path)


def test_commonsenseqa_rows_with_options_in_the_question_are_repaired(tmp_path):
    p = tmp_path / "CommonsenseQA" / "validation.jsonl"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"question": "What is good?\nA. newness\nB. loss",
                             "options": "\nC. light\nD. open mind", "answer": "D. open mind"}) + "\n")
    (d,) = B.load_task("commonsenseqa", tmp_path)
    assert d["choices"] == ["newness", "loss", "light", "open mind"] and d["gold"] == 3
    assert d["context"] == "Question: What is good?\nAnswer:"


def test_intervals():
    lo, hi = B.wilson(60, 100)
    assert lo == pytest.approx(0.5020, abs=1e-3) and hi == pytest.approx(0.6906, abs=1e-3)
    same = B.paired_change("1010", "1010")
    assert same["change"] == 0 and same["ci"] == [0, 0] and same["noise"]
    # 30 of 200 questions flipped from right to wrong, none the other way: a real drop
    c = B.paired_change("1" * 100 + "0" * 100, "0" * 30 + "1" * 70 + "0" * 100)
    assert c["change"] == pytest.approx(-0.15) and c["ci"][1] < 0 and not c["noise"]
    half = 1.96 * math.sqrt((30 - 200 * 0.15 ** 2) / 199 / 200)
    assert c["ci"][0] == pytest.approx(-0.15 - half, abs=1e-3)
