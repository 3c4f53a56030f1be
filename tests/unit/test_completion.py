"""Stop strings across pieces, and token ids that travel with the text they decode to."""

from __future__ import annotations

from worker.completion import Completion


def test_without_stops_everything_goes_out_at_once_with_its_ids() -> None:
    c = Completion([])
    out = c.feed("Hello", [1])
    assert (out.text, out.token_ids, out.stopped) == ("Hello", [1], False)
    assert c.feed("", [2]).token_ids == [2]  # a token that decodes to nothing (yet)


def test_a_stop_string_split_across_pieces_is_cut_and_its_ids_are_not_sent() -> None:
    c = Completion(["\nUser:"])
    sent = []
    for text, ids in [("The answer", [1, 2]), (" is 4.", [3, 4]), ("\nUs", [5]), ("er:", [6])]:
        out = c.feed(text, ids)
        sent.append((out.text, out.token_ids))
        if out.stopped:
            break
    assert "".join(t for t, _ in sent) == "The answer is 4."
    assert [i for _, ids in sent for i in ids] == [1, 2, 3, 4]
    assert out.stopped


def test_held_text_keeps_its_ids_until_it_is_released() -> None:
    c = Completion(["END"])
    first = c.feed("abcE", [1, 2])  # "E" may start END: held, and so are the piece's ids
    assert (first.text, first.token_ids) == ("abc", [])
    second = c.feed("EN", [3])  # "EEN": "EN" may still start END
    assert (second.text, second.token_ids) == ("E", [1, 2])
    third = c.feed("x", [4])  # "ENx" cannot: all released
    assert (third.text, third.token_ids) == ("ENx", [3, 4])
    assert (c.flush().text, c.flush().token_ids) == ("", [])


def test_a_piece_that_begins_before_the_stop_string_is_part_of_the_completion() -> None:
    c = Completion(["STOP"])
    out = c.feed("okSTOPmore", [7, 8, 9])
    assert (out.text, out.token_ids, out.stopped) == ("ok", [7, 8, 9], True)
