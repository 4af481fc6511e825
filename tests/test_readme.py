"""README.md's commands parse, and no document cites tracker numbers a reader cannot resolve.

Every ``python jobs/<name>.py ...`` command in README.md's ``bash`` blocks is handed to that
job's own ``build_parser()``, so a renamed or removed flag breaks this test, not a reader's run.
"""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
JOBS = sorted((ROOT / "jobs").glob("*.py"))

#: "issue 23", "session 34", "stop 29": tracker and work-log numbers, meaningless to a reader.
#: Word boundaries keep "reissue 2", "sessions", "stop-gap" and "the 2026 session" out of it.
TRACKER_REF = re.compile(r"\b(?:issue|session|stop)\s*#?\d+\b", re.IGNORECASE)


def bash_blocks(markdown: str) -> list[str]:
    """The bodies of the ```bash fenced blocks."""
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def job_commands(markdown: str) -> list[tuple[str, list[str]]]:
    """(job name, arguments) for each ``python jobs/<name>.py`` command in the bash blocks.

    Backslash-continued lines are joined; whatever stands before ``python jobs/`` on a line
    (an environment prefix, ``ray job submit ... --``) is dropped, and so is a trailing
    comment, a pipe or a second command after ``&&``/``;``.
    """
    commands = []
    for block in bash_blocks(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", line):
                match = re.search(r"\bpython3? jobs/(\w+)\.py\b(.*)", part)
                if match:
                    name, rest = match.groups()
                    commands.append((name, shlex.split(rest, comments=True)))
    return commands


def load_job(name: str):
    """A job module by file (``jobs/`` is not a package)."""
    path = ROOT / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_readme_job_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_parser_finds_commands_through_prefixes_and_continuations():
    text = (
        "```bash\n"
        "RAY_AUTH_MODE=token ray job submit --working-dir . -- \\\n"
        "    python jobs/kfold.py --out s3://B/run   # a comment\n"
        "python3 -m venv .venv && . .venv/bin/activate && python jobs/prepare.py --download\n"
        "```\n"
        "```text\npython jobs/kfold.py --not-bash\n```\n"
    )
    assert job_commands(text) == [("kfold", ["--out", "s3://B/run"]), ("prepare", ["--download"])]


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_job_has_build_parser(path):
    assert callable(getattr(load_job(path.stem), "build_parser", None))


def test_readme_runs_the_main_job():
    assert ("kfold", []) in job_commands(README.read_text())


@pytest.mark.parametrize(
    "name,args", job_commands(README.read_text()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_readme_command_parses(name, args):
    assert (ROOT / "jobs" / f"{name}.py").is_file(), f"README runs jobs/{name}.py, which is missing"
    parser = load_job(name).build_parser()
    try:
        parser.parse_args(args)
    except SystemExit as exit_:  # argparse exits on an unknown flag or a bad value
        pytest.fail(f"jobs/{name}.py does not accept {shlex.join(args)!r} (exit {exit_.code})")


def test_readme_fits_two_screens():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200


def test_readme_links_point_to_files_that_exist():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), target


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_no_issue_session_or_stop_numbers(path):
    hits = [
        f"{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if TRACKER_REF.search(line)
    ]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize(
    "text,cites",
    [
        ("as issue 23 measured", True),
        ("Session 34 (2026-12-04)", True),
        ("before (stop 29)", True),
        ("issue #12", True),
        ("the Ray session logs (/tmp/ray/session_latest/logs)", False),
        ("leave one session out", False),
        ("a `session` column, 2 sessions", False),
    ],
)
def test_the_tracker_pattern(text, cites):
    assert bool(TRACKER_REF.search(text)) is cites
