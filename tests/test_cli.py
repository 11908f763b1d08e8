"""The ``mfcon`` command line: one parser from the command-group modules, cheap to build."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mfcon import names
from mfcon.promotion import registry
from mfcon.cli import build_parser, main

COMMANDS = ("make-corpus", "prepare", "train", "study", "replicate", "report", "promote", "verify", "embed",
            "score", "sync", "tracking-server")


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
        names.DEFAULT_MODEL, names.SELECTION_METRICS[0], "runs", None)
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
