"""Annotation CSV parsing and validation, clip labels at span boundaries, the film-level split."""

from __future__ import annotations

import pytest

from kissray.annotations import (Span, clip_targets, format_annotations, parse_annotations, read_annotations,
                                 split_films, write_annotations)
from kissray.errors import UsageError


def spans(*rows) -> list[Span]:
    return [Span("f.mp4", a, b, label) for a, b, label in rows]


def test_reads_a_valid_file_with_labels_in_order(tmp_path):
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"x")
    csv = tmp_path / "ann.csv"
    csv.write_text(f"uri,start_s,end_s,label\n{tmp_path}/a.mp4,10,20,kiss\n{tmp_path}/a.mp4,0,10,none\n"
                   f"{tmp_path}/b.mp4,3.5,7,explicit\n\n")
    ann = read_annotations(str(csv))
    assert ann.labels == ["kiss", "explicit"]
    assert ann.films == [f"{tmp_path}/a.mp4", f"{tmp_path}/b.mp4"]
    assert [s.start_s for s in ann.spans[f"{tmp_path}/a.mp4"]] == [0, 10]  # sorted by start
    assert ann.split_of(f"{tmp_path}/a.mp4") is None


def test_every_bad_row_is_reported_with_its_line_number(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    a = f"{tmp_path}/a.mp4"
    text = ("uri,start_s,end_s,label,split\n"
            f"{a},5,5,kiss,\n"                      # line 2: end <= start
            f"{a},10,20,kiss,\n"                    # line 3: fine
            f"{a},15,25,none,\n"                    # line 4: overlaps line 3 with another label
            f"{tmp_path}/missing.mp4,0,4,kiss,\n"   # line 5: missing film
            f"{a},x,4,kiss,\n"                      # line 6: not a number
            f"{a},30,40,kiss,holdout\n")            # line 7: bad split
    with pytest.raises(UsageError) as err:
        parse_annotations(text, path="ann.csv")
    message = str(err.value)
    assert "5 bad row(s)" in message
    for line, words in [(2, "end_s 5 <= start_s 5"), (4, "overlaps"), (5, "film not found"),
                        (6, "not a number"), (7, "split must be one of")]:
        assert any(f"line {line}:" in row and words in row for row in message.splitlines()), (line, message)
    assert "line 3:" not in message


def test_unknown_and_missing_columns_are_reported():
    with pytest.raises(UsageError, match=r"line 1: unknown column\(s\) \['confidence'\]"):
        parse_annotations("uri,start_s,end_s,label,confidence\na,0,1,kiss,0.9\n", check_films=False)
    with pytest.raises(UsageError, match=r"missing column\(s\) \['label'\]"):
        parse_annotations("uri,start_s,end_s\na,0,1\n", check_films=False)


def test_overlap_with_the_same_label_is_allowed_and_conflicting_splits_are_not():
    ann = parse_annotations("uri,start_s,end_s,label\na,0,10,kiss\na,5,12,kiss\n", check_films=False)
    assert len(ann.spans["a"]) == 2
    with pytest.raises(UsageError, match="different splits"):
        parse_annotations("uri,start_s,end_s,label,split\na,0,1,kiss,train\na,2,3,kiss,test\n", check_films=False)


def test_a_file_of_only_negatives_has_no_label():
    with pytest.raises(UsageError, match="no positive label"):
        parse_annotations("uri,start_s,end_s,label\na,0,10,none\n", check_films=False)


def test_a_span_labels_a_clip_it_covers_for_half_a_second_or_more():
    idx, y = clip_targets(spans((2.5, 5.0, "kiss")), ["kiss"], 8)
    assert idx.tolist() == [2, 3, 4]  # clip 2 is covered exactly 0.5 s; clip 5 not at all
    assert y[:, 0].tolist() == [1, 1, 1]
    idx, _ = clip_targets(spans((2.6, 5.4, "kiss")), ["kiss"], 8)
    assert idx.tolist() == [3, 4]  # 0.4 s of clips 2 and 5 is not enough


def test_none_spans_are_negatives_and_a_tie_goes_to_the_label():
    idx, y = clip_targets(spans((0, 1.5, "kiss"), (1.5, 4, "none")), ["kiss"], 6)
    assert idx.tolist() == [0, 1, 2, 3]
    assert y[:, 0].tolist() == [1, 1, 0, 0]  # clip 1: 0.5 s kiss + 0.5 s none -> kiss


def test_adjacent_spans_of_one_label_add_up():
    idx, y = clip_targets(spans((0, 1.3, "kiss"), (1.3, 1.6, "kiss")), ["kiss"], 3)
    assert idx.tolist() == [0, 1] and y[:, 0].tolist() == [1, 1]  # clip 1: 0.3 + 0.3 s


def test_unlabelled_clips_are_ignored_or_negative():
    rows = spans((2, 4, "kiss"), (5, 6, "explicit"))
    idx, _ = clip_targets(rows, ["kiss", "explicit"], 8)
    assert idx.tolist() == [2, 3, 5]
    idx, y = clip_targets(rows, ["kiss", "explicit"], 8, unlabelled="negative")
    assert idx.tolist() == list(range(8))
    assert y.tolist() == [[0, 0]] * 2 + [[1, 0]] * 2 + [[0, 0]] + [[0, 1]] + [[0, 0]] * 2


def test_spans_past_the_end_of_the_film_are_clipped():
    idx, _ = clip_targets(spans((3, 100, "kiss")), ["kiss"], 5)
    assert idx.tolist() == [3, 4]


def _many_films(n: int, split_column: dict | None = None) -> str:
    split_column = split_column or {}
    rows = ["uri,start_s,end_s,label,split"]
    for i in range(n):
        rows += [f"film{i},0,5,kiss,{split_column.get(i, '')}", f"film{i},5,9,none,{split_column.get(i, '')}"]
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("n", [1, 2, 3, 10, 37])
def test_split_is_by_film_and_covers_every_film_once(n):
    ann = parse_annotations(_many_films(n), check_films=False)
    splits = split_films(ann, seed=3)
    all_films = [f for films in splits.values() for f in films]
    assert sorted(all_films) == sorted(ann.films)  # every film in exactly one split
    assert len(set(all_films)) == len(all_films)
    if n >= 3:
        assert splits["val"] and splits["test"] and splits["train"]
    if n >= 10:
        assert len(splits["train"]) >= n * 0.75
    assert split_films(ann, seed=3) == splits  # seeded: same split every time
    assert any(split_films(ann, seed=s) != splits for s in range(5)) or n < 3


def test_split_column_is_honoured():
    ann = parse_annotations(_many_films(10, {0: "test", 1: "val", 2: "train"}), check_films=False)
    splits = split_films(ann, seed=0)
    assert "film0" in splits["test"] and "film1" in splits["val"] and "film2" in splits["train"]
    assert len(set(sum(splits.values(), []))) == 10


def test_written_spans_read_back_unchanged(tmp_path):
    (tmp_path / "a b.mp4").write_bytes(b"x")
    film = str(tmp_path / "a b.mp4")
    written = [Span(film, 0.0, 2.5, "kiss", "train"), Span(film, 2.5, 1234567.0, "none", "train"),
               Span("s3://bucket/x,y.mkv", 0.1, 0.2, "kiss")]
    text = format_annotations(written)
    assert text.splitlines()[:2] == ["uri,start_s,end_s,label,split", f"{film},0,2.5,kiss,train"]
    assert "1234567," in text  # whole seconds as integers, never 1.23457e+06
    write_annotations(written[:2], str(tmp_path / "ann.csv"))
    ann = read_annotations(str(tmp_path / "ann.csv"))
    assert [(s.uri, s.start_s, s.end_s, s.label, s.split) for s in ann.spans[film]] == \
        [(s.uri, s.start_s, s.end_s, s.label, s.split) for s in written[:2]]
    other = parse_annotations(text, check_films=False).spans["s3://bucket/x,y.mkv"]  # quoted comma
    assert [(s.start_s, s.end_s, s.split) for s in other] == [(0.1, 0.2, None)]
