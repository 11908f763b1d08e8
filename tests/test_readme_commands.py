"""Docs that cannot drift: every command line in the README and docs/*.md parses against the real CLI, the
README's first steps run for real at smoke scale, and no doc names internal tickets or people.

As SpeechBrain and Optuna test their docs: a renamed flag, a removed subcommand or a missing required
argument in a documented command fails here, not in a reader's terminal. Command lines come from ```bash /
```sh / ```console blocks (and ``$ `` prompts in plain blocks), joined across ``\\`` continuations, and from
inline `mfcon ...` / `python pipelines/...` spans in the prose. Synopsis notation is expanded: ``[...]`` is
optional (kept, so every flag in it is checked), ``(a | b)`` and ``[--flag x | y]`` give one command per
alternative, and a value ``a|b`` one per choice.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from mfcon.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*```(\S*)\s*$")
PLACEHOLDERS = {"N": "2", "T": "0.5"}  # numbers a synopsis leaves to the reader (`--num-samples N`)


@dataclass(frozen=True)
class DocCommand:
    where: str  # README.md:96
    line: str  # the command line as written (continuations joined)
    inline: bool  # an inline `code span` in prose (a fragment: only its flags are checked)


def _joined(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Shell lines with ``\\`` continuations joined, each with its first line number."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, text in lines:
        start, sofar = pending or (number, "")
        text = sofar + " " + text.strip() if sofar else text.strip()
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip())
        else:
            pending = None
            out.append((start, text))
    if pending:
        out.append(pending)
    return out


def doc_lines(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(shell lines from code blocks, prose lines outside code blocks) of one Markdown file."""
    shell, prose, lang = [], [], None
    for number, text in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(text)
        if fence:
            lang = fence.group(1).lower() if lang is None else None
            continue
        if lang is None:
            prose.append((number, text))
        elif lang in SHELL_LANGS:
            shell.append((number, text[2:] if text.startswith("$ ") else text))
        elif lang == "" and text.lstrip().startswith("$ "):
            shell.append((number, text.lstrip()[2:]))
    return _joined(shell), prose


COMMAND_START = re.compile(r"(?:^|\s)(?:\.venv/bin/)?(?:mfcon|python3? (?:-m mfcon(?:\.cli)?|pipelines/\w+\.py))(?:\s|$)")


def doc_commands() -> list[DocCommand]:
    found = []
    for path in DOCS:
        shell, prose = doc_lines(path)
        name = path.relative_to(REPO)
        for number, text in shell:
            if COMMAND_START.search(text.split("#", 1)[0] if not text.lstrip().startswith("#") else ""):
                found.append(DocCommand(f"{name}:{number}", text, inline=False))
        for number, text in prose:
            for span in re.findall(r"`([^`]+)`", text):
                if re.match(r"(?:mfcon [a-z]|python3? (?:-m mfcon(?:\.cli)?(?:\s|$)|pipelines/))", span):
                    found.append(DocCommand(f"{name}:{number}", span, inline=True))
    return found


# ---------------------------------------------------------------- synopsis -> concrete argv

_GROUP = re.compile(r"(?<!\$)[\[(]([^\[\]()]*?\s\|\s[^\[\]()]*?)[\])]")  # (a | b), [--f x | y]; never $( ... )
_OPTIONAL = re.compile(r"(?:(?<=\s)|^)\[|\](?=\s|$)")


def expand(line: str) -> list[str]:
    """One line per alternative of each ``a | b`` group (an alternative without a flag takes the first's)."""
    m = _GROUP.search(line)
    if not m:
        return [_OPTIONAL.sub("", line)]
    alternatives = [a.strip() for a in m.group(1).split(" | ")]
    flag = alternatives[0].split()[0] if alternatives[0].startswith("-") else None
    out = []
    for alt in alternatives:
        alt = f"{flag} {alt}" if flag and not alt.startswith("-") else alt
        out += expand(line[:m.start()] + alt + line[m.end():])
    return out


def _choices(tokens: list[str]) -> list[list[str]]:
    """``--format html|md``: the first choice everywhere, then each other choice once."""
    piped = [i for i, t in enumerate(tokens) if re.fullmatch(r"[\w.-]+(\|[\w.-]+)+", t)]
    base = [t.split("|")[0] if i in piped else t for i, t in enumerate(tokens)]
    out = [base]
    for i in piped:
        for choice in tokens[i].split("|")[1:]:
            out.append(base[:i] + [choice] + base[i + 1:])
    return out


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(program, argv) for each mfcon / pipeline command in a shell line: ``mfcon`` (any subcommand) or
    ``pipelines/<name>.py``; environment assignments and a ``ray job submit ... --`` prefix are skipped."""
    out = []
    for variant in expand(line):
        tokens = [PLACEHOLDERS.get(t, t) for t in shlex.split(variant, comments=True)]
        segment: list[str] = []
        for token in [*tokens, "&&"]:
            if token not in ("&&", ";", "|"):
                segment.append(token)
                continue
            found = _program(segment)
            if found:
                out += [(found[0], argv) for argv in _choices(found[1])]
            segment = []
    return out


def _program(tokens: list[str]) -> tuple[str, list[str]] | None:
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
        tokens = tokens[1:]
    if "--" in tokens and tokens[:1] == ["ray"]:  # ray job submit ... -- <entrypoint>
        tokens = tokens[tokens.index("--") + 1:]
    if not tokens:
        return None
    exe, rest = tokens[0], tokens[1:]
    if exe == "mfcon" or exe.endswith("/mfcon"):
        return "mfcon", rest
    if re.fullmatch(r"(?:\S*/)?python3?", exe) and rest:
        if rest[:2] in (["-m", "mfcon.cli"], ["-m", "mfcon"]):
            return "mfcon", rest[2:]
        if rest[0].startswith("pipelines/"):
            return rest[0], rest[1:]
    return None


# ---------------------------------------------------------------- the real parsers


def _pipeline_module(name: str):
    spec = importlib.util.spec_from_file_location(f"doc_pipeline_{Path(name).stem}", REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(program: str, argv: list[str]) -> str | None:
    """None if the real parser takes ``argv``, else what it said."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if program == "mfcon":
                build_parser().parse_args(argv)
            elif program == "pipelines/study.py":  # `mfcon study` with --smoke-test on top
                build_parser().parse_args(["study", *[a for a in argv if a != "--smoke-test"]])
            elif program == "pipelines/demo.py":
                _pipeline_module(program).parse_args(argv)
            else:
                return f"{program}: no parser known to this test; add it to parse()"
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip() or f"exit {e.code}"
    return None


def _subparsers(parser):
    import argparse

    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def flags_unknown(program: str, argv: list[str]) -> list[str]:
    """The ``--flags`` in an inline fragment that the command does not have (values are not checked)."""
    if program == "mfcon":
        commands = _subparsers(build_parser())
        if not argv:  # the module named in prose (`python -m mfcon.cli`)
            return []
        names = argv[0].split("/")  # `mfcon report/promote`: each of them
        if not set(names) <= set(commands):
            return [f"a subcommand {argv[0]!r}"]
        known = set.intersection(*(set(commands[n]._option_string_actions) for n in names))
    elif program == "pipelines/study.py":
        known = set(_subparsers(build_parser())["study"]._option_string_actions) | {"--smoke-test"}
    else:
        known = {s for a in _capture_parser(_pipeline_module(program))._actions for s in a.option_strings}
    return [t.split("=")[0] for t in argv if t.startswith("--") and t.split("=")[0] not in known]


def _capture_parser(module):
    """The ArgumentParser a pipeline's ``parse_args`` builds, caught before it parses."""
    import argparse

    caught = []
    original = argparse.ArgumentParser.parse_args

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = catch
    try:
        with contextlib.suppress(SystemExit):
            module.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return caught[0]


COMMANDS = doc_commands()


def test_the_docs_have_commands_to_check():
    """The extraction itself: the README's synopsis, cluster and job lines and the docs' examples are found."""
    lines = {c.where.split(":")[0] for c in COMMANDS if not c.inline}
    assert {"README.md", "docs/evaluation.md", "docs/tracking_server.md"} <= lines, lines
    programs = {program for c in COMMANDS for program, _ in invocations(c.line)}
    assert programs == {"mfcon", "pipelines/study.py", "pipelines/demo.py"}, programs
    subcommands = {argv[0] for c in COMMANDS if not c.inline for program, argv in invocations(c.line)
                   if program == "mfcon"}
    core = {"make-corpus", "prepare", "train", "study", "replicate", "report", "promote", "score", "verify", "embed",
            "sync", "tracking-server"}
    assert core <= subcommands, f"no command block shows {core - subcommands}"
    assert "unrecognized arguments: --spaces" in parse("mfcon", ["study", "--spaces", "x.yaml"])  # a renamed flag
    assert "required" in parse("mfcon", ["train", "--config", "c.yaml"])  # a required argument left out
    assert flags_unknown("pipelines/demo.py", ["--smoke-test", "--smoke"]) == ["--smoke"]
    assert expand("mfcon prepare (--dev-speakers 8 | --dev-trials dev.txt) [--model A | B]") == [
        "mfcon prepare --dev-speakers 8 --model A", "mfcon prepare --dev-speakers 8 --model B",
        "mfcon prepare --dev-trials dev.txt --model A", "mfcon prepare --dev-trials dev.txt --model B"]


@pytest.mark.parametrize("command", [c for c in COMMANDS if not c.inline], ids=lambda c: c.where)
def test_every_documented_command_line_parses(command):
    calls = invocations(command.line)
    assert calls, f"{command.where}: no mfcon or pipeline command found in {command.line!r}"
    for program, argv in calls:
        error = parse(program, argv)
        assert error is None, f"{command.where}: `{program} {shlex.join(argv)}` does not parse:\n{error}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.inline], ids=lambda c: c.where)
def test_every_inline_command_names_real_flags(command):
    calls = invocations(command.line)
    assert calls, f"{command.where}: no command found in {command.line!r}"
    for program, argv in calls:
        unknown = flags_unknown(program, argv)
        assert not unknown, f"{command.where}: `{command.line}`: {program} has no {unknown}"


# ---------------------------------------------------------------- the README's first steps, for real

SMOKE = {"--speakers": "8", "--utts": "3", "--test-speakers": "2", "--dev-speakers": "2", "--workers": "1"}


def readme_command(subcommand: str, optional: bool) -> list[str]:
    """The README's ``mfcon <subcommand>`` line from its Commands block: with its bracketed options or without."""
    shell, _ = doc_lines(REPO / "README.md")
    for _, line in shell:
        calls = invocations(line if optional else _drop_optional(line))
        for program, argv in calls:
            if program == "mfcon" and argv[:1] == [subcommand]:
                return argv
    raise AssertionError(f"README.md has no `mfcon {subcommand}` line")


def _drop_optional(line: str) -> str:
    while True:
        shorter = re.sub(r"(?:(?<=\s)|^)\[[^\[\]]*\]", "", line)
        if shorter == line:
            return line
        line = shorter


def at_smoke_scale(argv: list[str], paths: dict[str, Path]) -> list[str]:
    out = list(argv)
    for i, token in enumerate(out):
        if i and out[i - 1] in SMOKE:
            out[i] = SMOKE[out[i - 1]]
        for doc_path, real in paths.items():
            if token.rstrip("/") == doc_path.rstrip("/") or token.startswith(doc_path.rstrip("/") + "/"):
                out[i] = str(real) + token[len(doc_path.rstrip("/")):]
    return out


@pytest.mark.slow
def test_the_readme_first_steps_run_at_smoke_scale(tmp_path, capsys):
    """`mfcon make-corpus` and `mfcon prepare` exactly as the README's Commands block writes them (its paths in a
    temporary folder, its sizes small): both succeed, and make-corpus's own `next:` line parses too."""
    from mfcon.cli import main

    paths = {"corpus/": tmp_path / "corpus", "shards/": tmp_path / "shards"}
    make = at_smoke_scale(readme_command("make-corpus", optional=True), paths)
    assert main(make) == 0, make
    printed = capsys.readouterr().out
    prepare = at_smoke_scale(readme_command("prepare", optional=False), paths)
    assert main(prepare) == 0, prepare
    assert (tmp_path / "shards" / "manifest.json").is_file()
    following = next(line for line in printed.splitlines() if line.startswith("next: mfcon prepare"))
    for program, argv in invocations(following[len("next: "):].split("   ")[0]):
        assert parse(program, argv) is None, following


# ---------------------------------------------------------------- what docs never say

TICKET = re.compile(r"\b(?:issue|ticket)s?\s*#?\d+|(?<![\w/.-])#\d{1,4}\b", re.IGNORECASE)
UPSTREAM = re.compile(r"\b(?:Ray|MLflow|Optuna|PyTorch|torch|torchaudio|SpeechBrain|WeSpeaker|SQLAlchemy|pyarrow|"
                      r"Arrow|psycopg2?|boto3|moto|uv|pip|Chromium|GitHub|[\w-]+/[\w-]+)['’]?s?\s+(?:issue|PR|pull)",
                      re.IGNORECASE)
PEOPLE = re.compile(r"the loop'?s owner|\ba helper\b|\bthe helper\b|\bthe reviewer\b|\breviewers?\b said|\bthe CEO\b|"
                    r"\bsteering\b|\bthe (?:developer|agent|assignee)s?\b|\bas (?:he|she) (?:said|asked)|"
                    r"/work/|RAY_NOTES|STYLE\.md", re.IGNORECASE)


def prose_files() -> list[Path]:
    return [*DOCS, *sorted((REPO / "pipelines").glob("*.py")), *sorted((REPO / "search_spaces").glob("*.yaml")),
            *sorted((REPO / "configs").glob("*.yaml"))]


def test_no_doc_names_internal_tickets_or_people():
    """Upstream issues are fine when they name their project ("Ray issue 65881"); our own tracker's numbers and
    the people who worked on a change mean nothing to a reader of the repository."""
    found = []
    for path in prose_files():
        for number, text in enumerate(path.read_text().splitlines(), 1):
            for m in TICKET.finditer(text):
                if not UPSTREAM.search(text[max(0, m.start() - 40):m.end()]):
                    found.append(f"{path.relative_to(REPO)}:{number}: {m.group(0)!r} in {text.strip()!r}")
            for m in PEOPLE.finditer(text):
                found.append(f"{path.relative_to(REPO)}:{number}: {m.group(0)!r} in {text.strip()!r}")
    assert not found, "\n".join(found)


def test_the_ticket_and_people_patterns_catch_what_they_should():
    assert TICKET.search("fixed in issue 20") and TICKET.search("see issue #7") and TICKET.search("(#12)")
    assert UPSTREAM.search("leaks (Ray issue 65881)") and not UPSTREAM.search("as issue 20 asked")
    assert PEOPLE.search("the loop's owner decided") and PEOPLE.search("written by a helper")
    assert not TICKET.search("sha256:#ab12 and C#") and not PEOPLE.search("files owner-only")
