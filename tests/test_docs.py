"""The docs against the code: every command and option the README and docs/ show exists with that spelling,
every `snd.x.y` name and repository path they cite resolves, docs/architecture.md names every module, and
the README's first two commands are what CI (.ci/run) runs."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import typer

from snd.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _commands() -> dict[str, object]:
    """Every leaf command of `snd` by its words ("bench distill") -> click command."""
    out: dict[str, object] = {}

    def walk(cmd, words):
        subs = getattr(cmd, "commands", None)
        if subs is None:
            out[" ".join(words)] = cmd
            return
        for name, sub in subs.items():
            walk(sub, words + [name])

    walk(typer.main.get_command(app), [])
    return out


def _code_snippets(text: str) -> list[str]:
    """Inline code spans and the lines of fenced code blocks."""
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        spans.extend(block.replace("\\\n", " ").splitlines())
    return spans


def _snd_invocations(snippet: str) -> list[tuple[list[str], str]]:
    """(command words, the rest up to the next shell separator) of every `snd ...` in a snippet."""
    found = []
    for m in re.finditer(r"(?:^|[\s(;&|])snd ((?:[a-z]+ ?)+)(.*?)(?=&&|;|\||#|$| snd )", snippet):
        found.append((m.group(1).split(), m.group(1) + " " + m.group(2)))
    return found


def test_doc_commands_use_real_options():
    cmds = _commands()
    groups = {w.split()[0] for w in cmds if " " in w}
    bad = []
    for doc in DOCS:
        for snippet in _code_snippets(doc.read_text()):
            for words, rest in _snd_invocations(snippet):
                name = " ".join(words[:2]) if words[0] in groups and " ".join(words[:2]) in cmds else words[0]
                if words[0] in groups and name == words[0]:
                    continue  # `snd cache info | verify | gc`-style lists name the group only
                if name not in cmds:
                    bad.append(f"{doc.name}: unknown command `snd {name}` in `{snippet.strip()}`")
                    continue
                opts = {o for p in cmds[name].params for o in (*p.opts, *p.secondary_opts)}
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                    if flag not in opts:
                        bad.append(f"{doc.name}: `snd {name}` has no {flag} (`{snippet.strip()}`)")
    assert not bad, "\n".join(bad)


def _help_texts() -> str:
    """Every option's help text (snd/pipeline/config.py), one per line."""
    import dataclasses

    from snd.pipeline import config as C

    return "\n".join(f.metadata.get("help", "") for cls in vars(C).values()
                     if isinstance(cls, type) and dataclasses.is_dataclass(cls) for f in dataclasses.fields(cls))


def test_doc_python_names_and_paths_exist():
    bad = []
    for doc, text in [(d, d.read_text()) for d in DOCS] + [(Path("config.py help"), _help_texts())]:
        for dotted in sorted(set(re.findall(r"\bsnd(?:\.[A-Za-z_]\w*)+", text))):
            parts = dotted.split(".")
            for i in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                    break
                except ImportError:
                    continue
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    bad.append(f"{doc.name}: {dotted}")
                    break
                obj = getattr(obj, attr)
        for path in sorted(set(re.findall(r"(?<![\w/.])((?:snd|tests|scripts|docs|\.ci)/[\w./-]*\w)(?![\w{<*/-])", text))):
            if not (ROOT / path.split("::")[0]).exists():
                bad.append(f"{doc.name}: no file {path}")
        for test in sorted(set(re.findall(r"(tests/test_\w+\.py)::(\w+)", text))):
            if f"def {test[1]}(" not in (ROOT / test[0]).read_text():
                bad.append(f"{doc.name}: no test {test[0]}::{test[1]}")
    assert not bad, "\n".join(bad)


def test_architecture_names_every_module():
    """Each module is named in docs/architecture.md by its path, or by its file (stem or `stem.py`) in a table
    row that names its folder."""
    rows = (ROOT / "docs" / "architecture.md").read_text().splitlines()
    missing = []
    for py in sorted((ROOT / "snd").rglob("*.py")):
        rel = py.relative_to(ROOT).as_posix()
        if py.name == "__init__.py" and py.parent.name != "snd":
            rel_dir = py.parent.relative_to(ROOT).as_posix() + "/"
            if not any(rel_dir in r for r in rows):
                missing.append(rel_dir)
            continue
        if py.name == "__init__.py":
            continue
        folder, stem = py.parent.relative_to(ROOT).as_posix() + "/", py.stem
        named = re.compile(rf"(?<![\w/.])({re.escape(stem)}(\.py)?)(?![\w/])")
        if not any(rel in r or (folder in r and named.search(r.replace(folder, " "))) for r in rows):
            missing.append(rel)
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_readme_first_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1).strip().splitlines()
    assert len(block) == 2, block
    install, tests = block
    ci = (ROOT / ".ci" / "run").read_text()
    pins = re.search(r"pip install (torch==\S+ torchvision==\S+)", install).group(1)
    assert f"pipq {pins}\n" in ci, "README's torch pins differ from .ci/run's"
    assert f"pip install {pins}" in (ROOT / "requirements.txt").read_text(), "README's torch pins differ from requirements.txt's"
    assert f"pip install {pins}" in (ROOT / "docs" / "install.md").read_text(), "README's torch pins differ from docs/install.md's"
    assert "pip install -r requirements.txt -e ." in install and "pipq -r requirements.txt -e .\n" in ci
    assert install.startswith("python3 -m venv .venv && . .venv/bin/activate") and "python3 -m venv .venv" in ci
    assert install.endswith("&& snd demo")
    assert tests == "python -m pytest -q tests"
    assert f"\n{tests}\n" in ci


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_is_a_config_field(name):
    """README: every option of every command is a field of a typed config in snd/pipeline/config.py."""
    cmd = _commands()[name]
    cls = getattr(cmd.callback, "snd_config", None)
    assert cls is not None, f"`snd {name}` is not built from a config dataclass (command_from_config)"
    from dataclasses import fields

    options = {p.name for p in cmd.params if p.param_type_name == "option" and p.name != "help"}
    assert options == {f.name for f in fields(cls)}


def test_doc_torchrun_lines_parse_with_torchruns_own_parser():
    """torchrun's argparse classifies every `--option` of its command line, even those meant for the script: an
    snd option that abbreviates two of its own (`--run`: `--run-path`, `--run_path`) stops it unless `--`
    comes first. Parse each documented torchrun line with torchrun's real parser."""
    import shlex

    from torch.distributed.run import get_args_parser

    lines = [line.strip() for doc in DOCS for line in _code_snippets(doc.read_text()) if line.strip().startswith("torchrun ")]
    assert lines, "docs/distill.md shows a torchrun command"
    for line in lines:
        args = shlex.split(line.replace("...", "x"))[1:]
        try:
            parsed = get_args_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"torchrun cannot parse: {line}")
        assert parsed.training_script == "snd.cli"
        assert [a for a in parsed.training_script_args if a.startswith("--")] == [a for a in args[args.index("snd.cli"):] if a.startswith("--")]


def test_readme_links_every_doc_page():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{p.name})" not in readme] == []
