"""The commands the documentation gives still parse: every ``lidar-completion``,
``lidar-completion-train`` / ``python -m training``, benchmark and script command line in README.md
and docs/ (fenced blocks and inline code) is handed to its own argument parser, stopped right after
parsing. A renamed or removed option then fails here instead of in a reader's terminal.

Lines with placeholders (``...``, ``<...>``, ``[--optional]``, ``{a,b}``) are not commands to run and
are left out; so are other programs (bash, pytest, colcon, pip)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from scripts_support import Refused, command_main, parse_only

from lidar_completion.errors import LidarCompletionError

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_PROGRAM = re.compile(r"(?:\.venv/bin/)?(?:lidar-completion(?:-train)?|python3?)$|(?:scripts|benchmarks)/.*\.py$")
_PLACEHOLDER = re.compile(r"\.\.\.|…|<[^>]*>|\[-[^\]]*\]|\{[a-z-]+(?:,[a-z-]+)+\}")


def _commands_of(text: str) -> list[tuple[int, str, bool]]:
    """(line, command, inline) of every candidate command of a markdown page: the lines of fenced
    blocks (continuation lines joined) and the inline code spans, cut at ``|``, ``&&``, ``;``,
    ``#``."""
    out, lines, block, i = [], text.splitlines(), False, 0
    while i < len(lines):
        line, start = lines[i], i + 1
        if line.lstrip().startswith("```"):
            block = not block
        elif block:
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            out.append((start, line, False))
        else:   # inline code: a command has words after its program (one word is a name)
            out.extend((start, span, True) for span in re.findall(r"`([^`]+)`", line) if " " in span.strip())
        i += 1
    cmds = []
    for n, cmd, inline in out:
        for part in re.split(r"\s(?:\||&&|;|#)\s|\s&$|\s#", cmd):
            part = part.strip()
            if part:
                cmds.append((n, part, inline))
    return cmds


def _argv(cmd: str) -> list[str] | None:
    """The command's words from its program on (environment assignments dropped), or None when it
    is not one of ours or has placeholders."""
    if _PLACEHOLDER.search(cmd):
        return None
    try:
        words = shlex.split(cmd)
    except ValueError:
        return None
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    if not words or not _PROGRAM.match(words[0]):
        return None
    # redirections, and shell arrays the page defines elsewhere ("${ARGS[@]}")
    words = [w for w in words if not re.match(r"^\d?>|^\$\{\w+\[@\]\}$", w)]
    if re.match(r"(?:\.venv/bin/)?python3?$", words[0]):
        if len(words) < 2 or (words[1].startswith("-") and words[1] != "-m"):   # -c, -S, ...
            return None
        if words[1] == "-m" and (len(words) < 3 or words[2] not in ("training", "training.bench")
                                and not words[2].startswith("lidar_completion")):
            return None
        words = words[1:]
    if words[0].endswith(".py") and not _PROGRAM.match(words[0]):
        return None
    return words


def doc_commands() -> list[tuple[str, list[str], bool]]:
    """(page:line, words, inline) of every documented command of ours."""
    found = []
    for page in PAGES:
        for line, cmd, inline in _commands_of(page.read_text()):
            argv = _argv(cmd)
            if argv is not None:
                found.append((f"{page.relative_to(ROOT)}:{line}", argv, inline))
    return found


def _check_training_config(ns) -> None:
    """A trainer command's config and ``--set`` overrides load and validate as the trainer would
    load them (unknown keys, wrong types and values are errors; paths are not opened). Overrides
    whose value is a shell variable of the page's loops (``seed=$s``) are left out."""
    from training.__main__ import resolve_config_path
    from training.config import load_config
    overrides = [o for o in ns.set if "$" not in o.partition("=")[2] or "/" in o.partition("=")[2]]
    overrides += [f"device={ns.device}"] if ns.device else []
    load_config(resolve_config_path(ns.config), kind=ns.kind, overrides=overrides)


def test_the_pages_give_commands():
    found = doc_commands()
    programs = {a[0].rsplit("/", 1)[-1] for _, a, _ in found}
    assert len(found) >= 60 and {"lidar-completion", "-m"} <= programs, programs


def test_every_documented_command_parses():
    """Fenced commands must parse as written; inline ones (prose naming a command and some of its
    options) may leave out required arguments or end on an option's name, but every option they
    give must exist and accept what they give it."""
    failures = []
    for where, argv, inline in doc_commands():
        try:
            main, rest = command_main(argv)
            ns = parse_only(main, rest)
            if ns is not None and getattr(ns, "set", None) is not None and getattr(ns, "config", None):
                _check_training_config(ns)
        except Refused as exc:
            # prose may name a command without its positional arguments, or end on an option
            # without its value
            msg = str(exc)
            excused = inline and (msg.startswith("the following arguments are required")
                                  or msg.endswith("expected one argument") and argv[-1].startswith("-"))
            if not excused:
                failures.append(f"{where}: {shlex.join(argv)}\n    {msg}")
        except (ImportError, LidarCompletionError) as exc:
            failures.append(f"{where}: {shlex.join(argv)}\n    {exc}")
    assert not failures, "\n".join(failures)
