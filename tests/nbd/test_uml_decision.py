"""The UML boot decision with fake boots (no UML needed): plain first, the fxsave fallback only
after the known failure, one message naming both attempts when neither works."""

from __future__ import annotations

import pytest

from tests.nbd.uml import FXSAVE, PANIC, PLAIN, Attempt, UmlUnusable, choose_boot_mode, expected_probe_line

OK = expected_probe_line() + "\n"
PANIC_CONSOLE = f"--- console ---\nKernel panic - not syncing: {PANIC}, errno = 14\n"
PYTHON_DIES = "Fatal Python error: error evaluating path\nSegmentation fault\n"


class FakeBoots:
    def __init__(self, **results: tuple[int | None, str]):
        self.results = results
        self.calls: list[str] = []

    def __call__(self, mode: str) -> Attempt:
        self.calls.append(mode)
        rc, out = self.results[mode]
        return Attempt(mode, rc, out, 1.0)


def test_plain_works_no_fallback_tried():
    boots = FakeBoots(plain=(0, OK), fxsave=(0, OK))
    d = choose_boot_mode(boots)
    assert d.mode == PLAIN and boots.calls == [PLAIN]
    assert "UML boot path: plain" in d.log_line()


def test_plain_panics_fallback_works():
    boots = FakeBoots(plain=(None, PANIC_CONSOLE), fxsave=(0, OK))
    d = choose_boot_mode(boots)
    assert d.mode == FXSAVE and boots.calls == [PLAIN, FXSAVE]
    line = d.log_line()
    assert line.startswith("UML boot path: fxsave") and PANIC in line


def test_plain_never_reports_fallback_works():
    boots = FakeBoots(plain=(None, "--- console ---\n"), fxsave=(0, OK))
    assert choose_boot_mode(boots).mode == FXSAVE
    assert "no exit status" in choose_boot_mode(FakeBoots(plain=(None, ""), fxsave=(0, OK))).log_line()


def test_both_fail_one_message_names_both():
    boots = FakeBoots(plain=(None, PANIC_CONSOLE), fxsave=(139, PYTHON_DIES))
    with pytest.raises(UmlUnusable) as e:
        choose_boot_mode(boots)
    msg = str(e.value)
    assert "\n" not in msg
    assert "plain boot: UML panicked" in msg and PANIC in msg
    assert "fxsave boot: the probe failed in the guest (rc=139: Fatal Python error" in msg


def test_unknown_plain_failure_is_not_papered_over():
    """Python crashing in a plainly booted guest is not the failure the fallback fixes: say so."""
    boots = FakeBoots(plain=(139, PYTHON_DIES), fxsave=(0, OK))
    with pytest.raises(UmlUnusable, match="fallback was not tried") as e:
        choose_boot_mode(boots)
    assert boots.calls == [PLAIN]
    assert "rc=139" in str(e.value)


def test_wrong_answer_is_not_ok():
    """A guest that exits 0 but computes a different hash (vector state not preserved) did not pass."""
    bad = Attempt(PLAIN, 0, "uml-probe-ok 00\n")
    assert not bad.ok and not bad.known_failure
    assert Attempt(PLAIN, 0, OK).ok
