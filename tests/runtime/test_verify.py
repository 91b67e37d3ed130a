"""verify_greedy: which early tokens stand, where to roll back, what comes next."""
import pytest

from adadecode_fx.runtime import Verdict, verify_greedy

PROMPT = [10, 11, 12, 13]


def test_all_accepted_and_next_token():
    tokens = PROMPT + [20, 21, 22]  # three early tokens
    # rows at positions 3..6 predict tokens 4..7; the last one is new
    v = verify_greedy(tokens, 3, [20, 21, 22, 99])
    assert v == Verdict(accepted=3, rejected_at=None, next_token=99)


def test_no_pending_tokens_just_extends():
    assert verify_greedy(PROMPT, 3, [42]) == Verdict(0, None, 42)


@pytest.mark.parametrize("wrong,expected", [(0, Verdict(0, 4, 77)), (1, Verdict(1, 5, 77)), (2, Verdict(2, 6, 77))])
def test_first_mismatch(wrong, expected):
    tokens = PROMPT + [20, 21, 22]
    preds = [20, 21, 22, 99]
    preds[wrong] = 77
    assert verify_greedy(tokens, 3, preds) == expected


def test_only_first_mismatch_counts():
    tokens = PROMPT + [20, 21, 22]
    # rows 1 and 2 both disagree: the verdict stops at the first, later rows are ignored
    assert verify_greedy(tokens, 3, [20, 50, 51, 99]) == Verdict(1, 5, 50)


def test_flush_confirms_without_new_token():
    tokens = PROMPT + [20, 21]
    # the flush runs no row for a new position: every row has a target inside `tokens`
    assert verify_greedy(tokens, 3, [20, 21]) == Verdict(2, None, -1)
    assert verify_greedy(tokens, 4, [21]) == Verdict(1, None, -1)
    assert verify_greedy(tokens, 3, [20, 5]) == Verdict(1, 5, 5)


def test_empty_predictions():
    assert verify_greedy(PROMPT + [20], 4, []) == Verdict(0, None, -1)


def test_prompt_rows_skipped_via_first_row_pos():
    tokens = PROMPT + [20]
    # a block that starts inside the prompt: rows for positions 1..4
    block = [30, 31, 20, 88]  # the model would not have predicted the prompt: it doesn't matter ...
    assert verify_greedy(tokens, 3, block[2:]) == Verdict(1, None, 88)  # ... when those rows are skipped
    # (had they been compared, the prompt itself would be "rejected")
    assert verify_greedy(tokens, 1, block) == Verdict(0, 2, 30)


def test_row_positions_are_offset_by_first_row_pos():
    tokens = [1, 2, 3, 4, 5, 6]
    assert verify_greedy(tokens, 2, [4, 5, 6, 7]) == Verdict(3, None, 7)
    assert verify_greedy(tokens, 1, [4, 5, 6, 7]) == Verdict(0, 2, 4)
