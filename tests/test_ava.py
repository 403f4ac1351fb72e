"""AVA v2.x -> annotations CSV (SPEC 10), on files written here in AVA's exact formats, and AVA -> train -> eval."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import colour_of_second, make_film
from kissray.annotations import clip_targets, read_annotations
from kissray.ava import convert_ava, find_action, parse_label_map, split_of_file
from kissray.cli import main
from kissray.errors import UsageError

# ava_action_list_v2.2.pbtxt's layout; ids here are not AVA's, so nothing can depend on a hard-coded one
LABEL_MAP = """\
label {
  name: "bend/bow (at the waist)"
  label_id: 1
  label_type: PERSON_MOVEMENT
}
label {
  name: "stand"
  label_id: 12
  label_type: PERSON_MOVEMENT
}
label {
  name: "hug (a person)"
  label_id: 40
  label_type: PERSON_INTERACTION
}
label {
  name: "kiss (a person)"
  label_id: 41
  label_type: PERSON_INTERACTION
}
label {
  name: "talk to (e.g., self, a person, a group)"
  label_id: 79
  label_type: PERSON_INTERACTION
}
label {
  name: "watch (a person)"
  label_id: 80
  label_type: PERSON_INTERACTION
}
"""
KISS, HUG, STAND, TALK, WATCH = 41, 40, 12, 79, 80

# video_id, middle_frame_timestamp, x1, y1, x2, y2, action_id, person_id: one row per box and action
TRAIN_ROWS = """\
vidA,0902,0.077,0.151,0.283,0.811,12,0
vidA,0902,0.332,0.194,0.481,0.891,80,1
vidA,0904,0.077,0.151,0.283,0.811,41,0
vidA,0903,0.077,0.151,0.283,0.811,12,0
vidA,0903,0.077,0.151,0.283,0.811,41,0
vidA,0903,0.332,0.194,0.481,0.891,41,1
vidA,0903,0.332,0.194,0.481,0.891,40,1
vidA,0905,0.100,0.150,0.300,0.800,12,0
vidA,0907,0.100,0.150,0.300,0.800,41,0
vidA,0908,0.100,0.150,0.300,0.800,79,3
-5KQ66BBWC4,0902,0.010,0.020,0.500,0.990,41,0
-5KQ66BBWC4,0902,0.510,0.020,0.990,0.990,41,1
-5KQ66BBWC4,0903,0.010,0.020,0.500,0.990,80,0
"""
VAL_ROWS = """\
vidB,0910,0.077,0.151,0.283,0.811,12,0
vidB,0910,0.332,0.194,0.481,0.891,80,1
vidB,0911,0.077,0.151,0.283,0.811,41,0
vidB,0912,0.077,0.151,0.283,0.811,12,0
vidB,0912,0.332,0.194,0.481,0.891,41,1
vidB,0913,0.332,0.194,0.481,0.891,79,1
vidGone,0902,0.077,0.151,0.283,0.811,41,0
vidGone,0903,0.077,0.151,0.283,0.811,12,0
"""
# (video, start_s, end_s, label, split) expected from the rows above, by hand
EXPECTED = [
    ("-5KQ66BBWC4.mp4", 902, 903, "kiss", "train"), ("-5KQ66BBWC4.mp4", 903, 904, "none", "train"),
    ("vidA.mp4", 902, 903, "none", "train"), ("vidA.mp4", 903, 905, "kiss", "train"),
    ("vidA.mp4", 905, 906, "none", "train"), ("vidA.mp4", 907, 908, "kiss", "train"),  # 906: not annotated
    ("vidA.mp4", 908, 909, "none", "train"),
    ("vidB.mkv", 910, 911, "none", "val"), ("vidB.mkv", 911, 913, "kiss", "val"),
    ("vidB.mkv", 913, 914, "none", "val"),
]


@pytest.fixture()
def ava(tmp_path):
    """AVA-format files; the videos are empty stand-ins (conversion only looks at their names)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("vidA.mp4", "vidB.mkv", "-5KQ66BBWC4.mp4", "unannotated.mp4", "notes.txt", "vidA.mp4.part"):
        (videos / name).write_bytes(b"")
    (tmp_path / "ava_action_list_v2.2.pbtxt").write_text(LABEL_MAP)
    (tmp_path / "ava_train_v2.2.csv").write_text(TRAIN_ROWS)
    (tmp_path / "ava_val_v2.2.csv").write_text(VAL_ROWS)
    return tmp_path


def _args(root, action: str = "kiss (a person)", *extra) -> list[str]:
    return ["annotations", "from-ava", "--csv", str(root / "ava_train_v2.2.csv"),
            "--csv", str(root / "ava_val_v2.2.csv"),
            "--label-map", str(root / "ava_action_list_v2.2.pbtxt"), "--action", action,
            "--videos", str(root / "videos"), "--out", str(root / "ann.csv"), *extra]


def test_conversion_is_exact_second_by_second(ava):
    result = convert_ava([ava / "ava_train_v2.2.csv", ava / "ava_val_v2.2.csv"], ava / "ava_action_list_v2.2.pbtxt",
                         "kiss (a person)", str(ava / "videos"))
    assert (result.action, result.action_id) == ("kiss (a person)", KISS)
    got = [(os.path.basename(s.uri), s.start_s, s.end_s, s.label, s.split) for s in result.spans]
    assert got == EXPECTED
    assert result.missing == ["vidGone"]
    assert result.videos["vidB"] == str(ava / "videos" / "vidB.mkv")
    assert result.seconds() == {"train": {"kiss": 4, "none": 4, "spans": 3, "videos": 2},
                                "val": {"kiss": 2, "none": 2, "spans": 1, "videos": 1}}


def test_written_csv_labels_exactly_the_annotated_keyframes(ava, capsys):
    assert main(_args(ava)) == 0
    out, err = capsys.readouterr()
    assert "1 of 4 annotated videos not found" in err and "vidGone" in err
    assert "wrote" in out and "'kiss (a person)' (id 41)" in out
    ann = read_annotations(str(ava / "ann.csv"))  # the format `kissray train` reads, films checked
    assert ann.labels == ["kiss"]
    assert {os.path.basename(f): ann.split_of(f) for f in ann.films} == {
        "-5KQ66BBWC4.mp4": "train", "vidA.mp4": "train", "vidB.mkv": "val"}
    per_second = {}
    for film, spans in ann.spans.items():
        idx, y = clip_targets(spans, ["kiss"], 2000)
        per_second[os.path.basename(film)] = dict(zip(idx.tolist(), y[:, 0].astype(int).tolist()))
    assert per_second == {"vidA.mp4": {902: 0, 903: 1, 904: 1, 905: 0, 907: 1, 908: 0},
                          "-5KQ66BBWC4.mp4": {902: 1, 903: 0},
                          "vidB.mkv": {910: 0, 911: 1, 912: 1, 913: 0}}


def test_offset_moves_keyframes_onto_cut_videos(ava):
    result = convert_ava([ava / "ava_val_v2.2.csv"], ava / "ava_action_list_v2.2.pbtxt", "kiss (a person)",
                         str(ava / "videos"), label="smooch", offset_s=900)
    assert [(s.start_s, s.end_s, s.label) for s in result.spans] == [(10, 11, "none"), (11, 13, "smooch"),
                                                                     (13, 14, "none")]
    with pytest.raises(UsageError, match=r"ava_val_v2.2.csv:1: middle_frame_timestamp must be a whole second >= 911"):
        convert_ava([ava / "ava_val_v2.2.csv"], ava / "ava_action_list_v2.2.pbtxt", "kiss (a person)",
                    str(ava / "videos"), offset_s=911)


def test_malformed_rows_are_reported_with_file_and_line(ava, capsys):
    bad = ava / "ava_train_v2.2.csv"
    lines = TRAIN_ROWS.splitlines()
    lines[2] = "vidA,09x4,0.077,0.151,0.283,0.811,41,0"  # line 3
    lines[5] = "vidA,0903,0.332,0.194,0.481,0.891,41"  # line 6: 7 columns
    lines[8] = "vidA,0907,0.1,0.15,abc,0.8,41,0"  # line 9
    bad.write_text("\n".join(lines) + "\n")
    assert main(_args(ava)) == 2
    err = capsys.readouterr().err
    assert "3 malformed AVA row(s)" in err
    assert f"{bad}:3: middle_frame_timestamp is not a number: '09x4'" in err
    assert f"{bad}:6: 7 columns, expected 8" in err
    assert f"{bad}:9: x2 is not a finite number: 'abc'" in err
    assert not (ava / "ann.csv").exists()


def test_unknown_action_lists_close_matches(ava, capsys):
    assert main(_args(ava, "kissing")) == 2
    err = capsys.readouterr().err
    assert "no action named 'kissing'" in err and "'kiss (a person)'" in err
    with pytest.raises(UsageError, match=r"close matches: .*'hug \(a person\)'"):
        find_action(parse_label_map(LABEL_MAP), "hugs (a person)")


def test_label_map_items_with_id_and_label_id_and_lookup_by_name():
    text = ('# a comment: label { name: "fake" label_id: 3 }\n'
            'item {\n  name: "kiss (a person)"  # trailing comment\n  id: 7\n}\n'
            'item { name: "talk to (e.g., self, a person, a group)" id: 9 }\n'
            'label { name: "stand" label_id: 12 label_type: PERSON_MOVEMENT }\n')
    names = parse_label_map(text)
    assert names == {"kiss (a person)": 7, "talk to (e.g., self, a person, a group)": 9, "stand": 12}
    assert find_action(names, "kiss (a person)") == ("kiss (a person)", 7)
    assert find_action(names, "Kiss  (A person)") == ("kiss (a person)", 7)  # case and spacing
    assert find_action(names, "kiss") == ("kiss (a person)", 7)  # the name before its parenthesis
    with pytest.raises(UsageError, match="two ids"):
        parse_label_map('label { name: "kiss" label_id: 1 }\nlabel { name: "kiss" label_id: 2 }\n')
    with pytest.raises(UsageError, match="not an AVA label map"):
        parse_label_map("video_id,timestamp\n")
    with pytest.raises(UsageError, match=r"m.pbtxt:2: item without a name"):
        parse_label_map('label { name: "a" label_id: 1 }\nlabel { name: "b" }\n', "m.pbtxt")


def test_split_comes_from_the_file_name(ava):
    assert split_of_file("/data/ava/ava_train_v2.2.csv") == "train"
    assert split_of_file("s3://b/ava_val_v2.1.csv") == "val"
    assert split_of_file("/data/mine.csv") is None
    with pytest.raises(UsageError, match="both"):
        split_of_file("ava_trainval.csv")
    (ava / "ava_val_copy.csv").write_text("vidA,0950,0.1,0.1,0.2,0.2,41,0\n")  # vidA is a train video
    with pytest.raises(UsageError, match=r"ava_val_copy.csv:1: video vidA is also in a train file"):
        convert_ava([ava / "ava_train_v2.2.csv", ava / "ava_val_copy.csv"], ava / "ava_action_list_v2.2.pbtxt",
                    "kiss (a person)", str(ava / "videos"))


def test_videos_from_any_fsspec_uri_and_nothing_found(ava):
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("vidA.mp4", "vidB.webm"):
        fs.pipe(f"/ava-videos/{name}", b"")
    result = convert_ava([ava / "ava_train_v2.2.csv", ava / "ava_val_v2.2.csv"], ava / "ava_action_list_v2.2.pbtxt",
                         "kiss (a person)", "memory://ava-videos")
    assert result.videos == {"vidA": "memory://ava-videos/vidA.mp4", "vidB": "memory://ava-videos/vidB.webm"}
    assert result.missing == ["-5KQ66BBWC4", "vidGone"]
    with pytest.raises(UsageError, match=r"none of the 4 annotated videos .* \(first ids: -5KQ66BBWC4, vidA"):
        convert_ava([ava / "ava_train_v2.2.csv", ava / "ava_val_v2.2.csv"], ava / "ava_action_list_v2.2.pbtxt",
                    "kiss (a person)", str(ava))
    with pytest.raises(UsageError, match="not a directory"):
        convert_ava([ava / "ava_train_v2.2.csv"], ava / "ava_action_list_v2.2.pbtxt", "kiss (a person)",
                    str(ava / "nowhere"))


def test_two_files_for_one_video_are_reported_and_the_first_is_used(ava, capsys):
    (ava / "videos" / "vidA.mkv").write_bytes(b"")
    assert main(_args(ava)) == 0
    assert f"vidA: 2 files, using {ava / 'videos' / 'vidA.mkv'}" in capsys.readouterr().err
    assert str(ava / "videos" / "vidA.mkv") in (ava / "ann.csv").read_text()


def test_usage_errors_exit_2(ava, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["annotations"])  # no source given
    assert exit_info.value.code == 2
    assert main(_args(ava, "kiss (a person)", "--label", "none")) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # refused by the option's parser, named
        main(_args(ava, "kiss (a person)", "--offset-s", "-1"))
    assert exit_info.value.code == 2 and "--offset-s" in capsys.readouterr().err
    (ava / "ava_action_list_v2.2.pbtxt").unlink()
    assert main(_args(ava)) == 2
    assert "no such label map file" in capsys.readouterr().err


# ---------------------------------------------------------------- AVA -> train -> eval

FILM_S = 16
OFFSET_S = 900  # the films stand for 15-minute cuts starting at 900 s: keyframe 902 is their second 2
KISS_COLOUR = 3  # "kiss" is every second showing colour_of_second(3) (yellow): seconds 3 and 11


def _ava_rows(video_id: str, seconds: list[int], rng: np.random.Generator) -> list[str]:
    """AVA rows for ``seconds``: two or three people a second, other actions, kiss on the kiss seconds."""
    rows = []
    for t in seconds:
        kiss = (colour_of_second(t) == colour_of_second(KISS_COLOUR)).all()
        for person in range(int(rng.integers(2, 4))):
            x1, y1 = rng.uniform(0, 0.5, 2)
            box = f"{x1:.3f},{y1:.3f},{x1 + 0.3:.3f},{y1 + 0.4:.3f}"
            actions = [int(rng.choice([STAND, TALK, WATCH]))] + ([KISS] if kiss and person < 2 else [])
            rows += [f"{video_id},{t + OFFSET_S:04d},{box},{a},{person}" for a in actions]
    return rows


@pytest.fixture(scope="module")
def ava_corpus(tmp_path_factory):
    """Four train films (one .mkv), two val films, one annotated video that was never downloaded."""
    root = tmp_path_factory.mktemp("ava-corpus")
    (root / "videos").mkdir()
    rng = np.random.default_rng(0)
    csvs = {"train": [], "val": []}
    names = {"tr0": ".mp4", "tr1": ".mkv", "tr2": ".mp4", "tr3": ".mp4", "va0": ".mp4", "va1": ".mp4", "gone": None}
    for i, (video_id, ext) in enumerate(names.items()):
        if ext:
            make_film(root / "videos" / f"{video_id}{ext}", duration_s=FILM_S,
                      tone_seconds=[s for s in range(FILM_S) if rng.random() < 0.3])  # tones unrelated to kiss
        seconds = [s for s in range(1, FILM_S) if rng.random() < 0.85]  # keyframes with gaps
        csvs["val" if video_id.startswith("va") else "train"] += _ava_rows(video_id, seconds, rng)
    for split, rows in csvs.items():
        (root / f"ava_{split}_v2.2.csv").write_text("\n".join(rows) + "\n")
    (root / "ava_action_list_v2.2.pbtxt").write_text(LABEL_MAP)
    return root


def test_ava_to_train_to_eval_learns_the_action(ava_corpus, capsys):
    from kissray.model import load_model
    from kissray.score import score_film

    root = ava_corpus
    assert main(["annotations", "from-ava", "--csv", str(root / "ava_train_v2.2.csv"), "--csv",
                 str(root / "ava_val_v2.2.csv"), "--label-map", str(root / "ava_action_list_v2.2.pbtxt"),
                 "--action", "kiss (a person)", "--videos", str(root / "videos"), "--offset-s", str(OFFSET_S),
                 "--out", str(root / "ann.csv")]) == 0
    assert "1 of 7 annotated videos not found" in capsys.readouterr().err
    assert main(["train", "--annotations", str(root / "ann.csv"), "--out", str(root / "ck"), "--modality", "video",
                 "--image-size", "32", "--epochs", "10", "--lr", "0.01", "--batch-size", "16"]) == 0
    metrics = json.loads((root / "ck" / "metrics.json").read_text())
    rate = metrics["balance"]["positive_rate"]["kiss"]
    assert 0.05 < rate < 0.2 and metrics["balance"]["method"] == "pos-weight"  # chosen from the frequencies
    assert metrics["balance"]["pos_weight"]["kiss"] == pytest.approx((1 - rate) / rate)
    assert metrics["selection"]["metric"] == "ap" and len(metrics["splits"]["val"]) == 2
    assert main(["eval", "--annotations", str(root / "ann.csv"), "--model", str(root / "ck"), "--split", "val",
                 "--out", str(root / "eval.json"), "--min-len", "1"]) == 0
    report = json.loads((root / "eval.json").read_text())
    seconds = report["per_second"]["kiss"]
    val_rate = (seconds["tp"] + seconds["fn"]) / seconds["n_seconds"]
    assert seconds["ap"] >= 0.9 and seconds["ap"] > 3 * val_rate  # chance AP is about the positive rate
    assert report["summary"]["per_second_ap"] == seconds["ap"]
    assert "per-second AP" in capsys.readouterr().err
    # keyframe t -> clip t through the offset: the model fires on the yellow seconds of a new film
    film = make_film(root / "fresh.mp4", duration_s=FILM_S, tone_seconds=())
    probs = score_film(film, load_model(str(root / "ck")), min_len=1).probs[:, 0]
    kiss = [s for s in range(FILM_S) if (colour_of_second(s) == colour_of_second(KISS_COLOUR)).all()]
    assert kiss == [3, 11]
    assert probs[kiss].min() > np.delete(probs, kiss).max()
