"""Method options: one typed schema per method parses `--option KEY=VALUE` and the method's own flags; the CLI
flags are generated from the schemas (madclip_train/cli.py names no method)."""

from __future__ import annotations

import pytest

from madclip_runtime.errors import MadclipError
from madclip_train.cli import method_options, train_main, train_parser
from madclip_train.methods import all_methods, get_method

BASE = ["--data", "unused", "--out", "unused"]


def _options(*argv: str) -> dict:
    return method_options(train_parser().parse_args([*BASE, *argv]))


@pytest.mark.parametrize(
    "word, value",
    [
        ("no", False),
        ("No", False),
        ("false", False),
        ("0", False),
        ("off", False),
        ("yes", True),
        ("TRUE", True),
        ("1", True),
        ("on", True),
    ],
)
def test_boolean_words(word, value):
    assert _options("--method", "mvfa", "--option", f"bank_cls={word}") == {"bank_cls": value}
    assert get_method("mvfa").option_schema.validate({"bank_cls": word})["bank_cls"] is value


def test_bank_cls_no_is_false_not_true():
    """Before the schema, `--option bank_cls=no` trained with bank_cls=True (any non-"false" text was truthy)."""
    opts = get_method("mvfa").option_schema.validate(_options("--method", "mvfa", "--option", "bank_cls=no"))
    assert opts["bank_cls"] is False


@pytest.mark.parametrize("word", ["maybe", "", "2", "nope"])
def test_other_boolean_words_are_one_line_errors(word, capsys, tmp_path):
    rc = train_main(
        [
            "--method",
            "mvfa",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "r"),
            "--option",
            f"bank_cls={word}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "bank_cls" in err and "true/false" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_typed_values_and_choices():
    assert _options("--method", "mediclip", "--option", "holdout_per_shot=4") == {"holdout_per_shot": 4}
    with pytest.raises(MadclipError, match="holdout_per_shot: expected an integer|holdout_per_shot"):
        _options("--method", "mediclip", "--option", "holdout_per_shot=four")
    with pytest.raises(MadclipError, match="must be one of"):
        _options("--method", "mvfa", "--option", "det_loss=hinge")
    with pytest.raises(MadclipError, match="has no such option"):
        _options("--method", "madclip", "--option", "det_loss=bce")
    with pytest.raises(MadclipError, match="expected KEY=VALUE"):
        _options("--method", "mvfa", "--option", "det_loss")


def test_method_flags_come_from_the_schema():
    assert _options(
        "--method", "mediclip", "--synth-tasks", "cutpaste=0.5", "gauss", "--focal-target", "threshold"
    ) == {"tasks": "cutpaste=0.5,gauss=0.5", "focal_target": "threshold"}
    with pytest.raises(MadclipError, match="apply to --method mediclip only"):
        _options("--method", "mvfa", "--focal-target", "threshold")


def test_every_method_declares_its_interface():
    for cls in all_methods():
        assert cls.title and cls.fp32_island_constants
        assert cls.option_schema.method == cls.name
        assert cls.default_options() == cls.option_schema.defaults()
    assert get_method("mvfa").fp32_island_constants != get_method("madclip").fp32_island_constants


def test_cli_names_no_method():
    from pathlib import Path

    import madclip_train.cli as cli

    text = Path(cli.__file__).read_text().lower()
    for cls in all_methods():
        assert f'"{cls.name}"' not in text and f"methods.{cls.name}" not in text
