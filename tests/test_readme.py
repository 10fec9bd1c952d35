"""The README cannot drift: its CLI reference is the commands' own --help, and its
quickstart is what .ci/run runs."""

from pathlib import Path

from dsdeploy.cli.docs import END, START, render_reference, replace_section

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_matches_help():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme == replace_section(readme, render_reference()), (
        "README's CLI reference is stale: run `python -m dsdeploy.cli.docs README.md`")
    assert START in readme and END in readme


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci
    assert 'pip install -e ".[test,openvino,timm]"' in readme and '-e ".[test,openvino,timm]"' in ci
