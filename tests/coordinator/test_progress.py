"""Progress lines joined into complete round rows (coordinator.progress)."""

from __future__ import annotations

from coordinator.progress import EVALUATED_IN_ROUND, EVALUATED_WITH_NEXT_ROUND, CompletedRounds, read_rows


def _round(n: int, evaluation: str = EVALUATED_WITH_NEXT_ROUND) -> dict:
    return {"event": "round", "round": n, "evaluation": evaluation, "seconds": 5.0,
            "sites": {"h0": {"num_examples": 8, "train_seconds": 4.0}, "h1": {"num_examples": 6, "train_seconds": 3.0}}}


def test_a_plain_rounds_row_is_complete_when_its_evaluation_arrives_in_the_next_round():
    completed = CompletedRounds()
    assert completed.add(_round(1)) == []
    assert completed.add(_round(2)) == []
    [row] = completed.add({"event": "evaluated", "round": 1, "sites": {"h0": {"dice": 0.7, "eval_seconds": 0.2}}})
    assert row["round"] == 1 and row["sites"]["h0"] == {"num_examples": 8, "train_seconds": 4.0, "dice": 0.7, "eval_seconds": 0.2}
    assert row["sites"]["h1"] == {"num_examples": 6, "train_seconds": 3.0}  # it did not evaluate
    [last] = completed.add({"event": "evaluated", "round": 2, "sites": {"h1": {"dice": 0.5}}, "final_evaluation_seconds": 1.5})
    assert last["round"] == 2 and last["final_evaluation_seconds"] == 1.5 and last["sites"]["h1"]["dice"] == 0.5


def test_a_row_evaluated_in_its_round_is_complete_at_once_and_stray_evaluations_are_ignored():
    completed = CompletedRounds()
    row = _round(1, EVALUATED_IN_ROUND)
    assert completed.add(row) == [row]
    assert completed.add({"event": "evaluated", "round": 1, "sites": {"h0": {"dice": 0.1}}}) == []  # nothing waits for it
    assert completed.add({"event": "finished"}) == []


def test_read_rows_stops_at_a_line_still_being_written(tmp_path):
    path = tmp_path / "rounds.jsonl"
    assert read_rows(path) == []
    path.write_text('{"event": "round", "round": 1}\n{"event": "evalu', encoding="utf-8")
    assert read_rows(path) == [{"event": "round", "round": 1}]


def test_a_resumed_runs_first_evaluation_completes_a_round_the_follower_never_saw_and_no_round_comes_twice():
    """`fedsilo plan resume` follows a new stream: its first line is the interrupted round's ``evaluated`` line, which
    carries the whole row; a late re-read of the log (submit's fallback) returns nothing twice."""
    completed = CompletedRounds()
    full = {**_round(3), "event": "evaluated", "sites": {"h0": {"num_examples": 8, "dice": 0.7}}}
    [row] = completed.add(full)
    assert row["round"] == 3 and row["sites"]["h0"]["dice"] == 0.7 and "event" not in row
    assert completed.add(_round(4)) == []
    assert [r["round"] for r in completed.add({**_round(4), "event": "evaluated"})] == [4]
    for line in (full, _round(4), {**_round(4), "event": "evaluated"}):  # the same lines read again
        assert completed.add(line) == []


def test_round_table_with_fixed_sites_prints_its_header_at_once_and_a_dash_for_a_silent_site():
    # The demo knows its sites before any round: the header comes first, and a site that did not reply keeps its
    # column ("-"); without ``sites`` the first row's sites are the columns (coordinator.submit, tested there).
    import io

    from coordinator.progress import RoundTable

    out = io.StringIO()
    table = RoundTable("dice", out, sites=["hospital0", "hospital1"])
    assert out.getvalue().split() == ["round", "silos", "train", "loss", "dice", "h0", "dice", "h1", "eps", "h0", "eps", "h1", "seconds"]
    table.add({"event": "round", "round": 1, "replied": 1, "silos": 2, "seconds": 3.0, "evaluation": EVALUATED_IN_ROUND,
               "sites": {"hospital1": {"train_loss": 0.5, "num_examples": 4, "dice": 0.75, "epsilon": 1.0}}})
    row = out.getvalue().splitlines()[1]
    assert row.split() == ["1", "1/2", "0.500", "-", "0.750", "-", "1.00", "3.0"]
