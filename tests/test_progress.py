"""Progress bars show on a terminal only: quiet in CI and when stderr is not a tty."""

import sys

from models.loading.progress import progress, quiet


def test_quiet_in_ci_and_without_a_terminal(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert not quiet()
    monkeypatch.setenv("CI", "1")
    assert quiet()
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert quiet()


def test_progress_yields_every_item():
    assert list(progress(range(5), "counting")) == [0, 1, 2, 3, 4]
