"""README.md shows exactly two set-up commands, and CI runs the test command verbatim."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    # every fenced block with its language (pairing each opening fence with its own closing one),
    # then the shell blocks among them
    blocks = re.findall(r"```([a-z]*)\n(.*?)```", text, flags=re.S)
    setup = [b.strip() for language, b in blocks if language in ("", "bash", "sh", "console") and "pip install" in b]
    return setup


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    setup = _readme_commands()
    assert len(setup) == 2, setup
    main_job, tests = setup
    assert "gandissect-jax dissect" in main_job
    assert "pytest" in tests
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f]
    assert tests in ci_lines, "the .ci/run script must call the README's test command verbatim"
