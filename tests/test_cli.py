"""The ``mfcon`` command line: one parser from the command-group modules, cheap to build."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mfcon import names
from mfcon.promotion import registry
from mfcon.cli import build_parser, main

COMMANDS = ("make-corpus", "prepare", "train", "study", "replicate", "report", "promote", "verify", "embed",
            "score", "sync", "tracking-server", "export")


def _imports_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("code", [
    "from mfcon.cli import build_parser; build_parser()",
    "from mfcon.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
])
def test_building_the_parser_imports_no_mlflow(code):
    loaded = _imports_after(code)
    assert "mfcon.cli" in loaded
    assert not {m for m in loaded if m.split(".")[0] in ("mlflow", "ray", "torch")}


def test_every_command_is_there_with_its_shared_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for command in ("study", "report", "promote", "verify", "embed"):
        options = {o for a in sub.choices[command]._actions for o in a.option_strings}
        assert {"--workdir", "--tracking-uri"} <= options, command
        assert sub.choices[command].get_default("func") is not None


def test_defaults_come_from_the_shared_names():
    args = build_parser().parse_args(["promote"])
    assert (args.model_name, args.metric, args.workdir, args.tracking_uri) == (
        names.DEFAULT_MODEL, None, "runs", None)  # metric None: the study's own metric picks the challenger
    assert names.SELECTION_METRICS[0] == "dev_eer"
    assert build_parser().parse_args(["verify", "a.wav", "b.wav"]).model == names.DEFAULT_MODEL_URI
    assert build_parser().parse_args(["embed", "x", "--out", "y"]).model == "models:/mfcon-speaker@champion"
    assert registry.SELECTION_METRICS is names.SELECTION_METRICS and registry.RegistryError is names.RegistryError


def test_python_m_runs_the_same_command():
    done = subprocess.run([sys.executable, "-m", "mfcon.cli", "promote", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--n-boot" in done.stdout and "--tracking-uri" in done.stdout


def test_input_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["promote", "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: promote needs --study NAME and --data DIR (or --rollback)"


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return parser, sub.choices


def test_every_option_of_every_command_has_help_and_shows_its_default():
    import argparse

    from mfcon.cli.common import HelpFormatter, has_default

    parser, commands = _subcommands()
    missing, no_default = [], []
    for name, p in [("mfcon", parser), *commands.items()]:
        formatter = HelpFormatter(prog=name)
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
            shown = formatter._get_help_string(action) or ""
            if has_default(action) and "default" not in shown:
                no_default.append(f"{name} {action.option_strings[0]}")
    assert missing == [], f"options without help: {missing}"
    assert no_default == [], f"options whose help hides their default: {no_default}"
    rendered = commands["prepare"].format_help()
    assert "(default: 256)" in rendered and "(default: 2)" in rendered  # --rows-per-shard, --workers
    assert "bootstrap seed (default: 0)" in " ".join(commands["score"].format_help().split())  # 0 is a default too


def test_version_and_one_line_usage_errors():
    done = subprocess.run([sys.executable, "-m", "mfcon.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"mfcon {__import__('mfcon').__version__}"
    done = subprocess.run([sys.executable, "-m", "mfcon.cli", "train", "--config"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "error: mfcon train: argument --config: expected one argument (see mfcon train --help)"]


def test_an_unexpected_error_is_one_line_naming_its_traceback_file(tmp_path, monkeypatch, capsys):
    """A bug (not an input error) still ends in one line; the traceback goes to a file in MFCON_CRASH_DIR."""
    from mfcon.cli.common import run

    def bug(args):
        return {}["missing-key"]

    monkeypatch.setenv("MFCON_CRASH_DIR", str(tmp_path / "crash"))
    monkeypatch.delenv("MFCON_TRACEBACK", raising=False)
    code = run(build_parser().parse_args(["sync", "--name", "x"]).__class__(func=bug), ["sync"])
    err = capsys.readouterr().err
    (report,) = (tmp_path / "crash").iterdir()
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: unexpected KeyError: 'missing-key'")
    assert str(report) in err and "Traceback" not in err
    assert "Traceback (most recent call last)" in report.read_text() and "missing-key" in report.read_text()


def test_a_plain_value_error_from_mfcon_is_an_input_error_one_from_a_library_is_not():
    from mfcon.cli.common import is_input_error
    from mfcon.serving import list_audio_inputs  # raises plain ValueError for a missing folder

    try:
        list_audio_inputs("/no/such/folder")
    except ValueError as e:
        assert is_input_error(e)
    try:
        int("x")
    except ValueError as e:
        assert not is_input_error(e)  # raised inside Python itself: a bug in mfcon's handling, not the user's
    assert is_input_error(FileNotFoundError(2, "No such file or directory", "x.wav"))
    assert not is_input_error(KeyError("k"))


def test_the_train_command_s_file_names_are_the_checkpoint_module_s():
    from mfcon.train import checkpoint, local

    assert (local.BEST_FILE, local.LAST_FILE) == (checkpoint.BEST_FILE, checkpoint.LAST_FILE)


def test_the_parser_s_top_n_floor_is_score_norm_s():
    from mfcon.cli.common import MIN_TOP_N
    from mfcon.evaluation.score_norm import MIN_TOP_N as SCORER_MIN

    assert MIN_TOP_N == SCORER_MIN
