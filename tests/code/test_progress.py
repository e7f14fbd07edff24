"""The progress reporter: plain timed lines off a terminal, a rich bar on one."""

from __future__ import annotations

import io

import pytest

from upbeat.data.sources import fetch_sentiment140
from upbeat.errors import UpbeatError
from upbeat.progress import Progress, duration, seconds_from_env

SFT_FIELDS = (("loss", "sft/loss", ".3f"), ("lr", "sft/lr", ".1e"))


class Clock:
    """A hand-moved clock: `now` seconds since the reporter started."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def reporter(clock: Clock, total: int | None = 10, seconds: float = 15, **kwargs) -> Progress:
    return Progress("sft", total, stream=io.StringIO(), seconds=seconds, clock=clock, **kwargs)


def lines(progress: Progress) -> list[str]:
    return progress.stream.getvalue().splitlines()


def test_first_update_is_written_with_metrics_elapsed_and_eta():
    clock = Clock()
    p = reporter(clock, total=125, fields=SFT_FIELDS)
    clock.now = 2.0
    p.update(1, {"sft/loss": 3.8123, "sft/lr": 9.2e-5, "sft/other": 1.0})
    # one step in 2 s, 124 to go: 248 s
    assert lines(p) == ["sft: step 1/125  loss 3.812  lr 9.2e-05  elapsed 0m02s  eta 4m08s"]


def test_lines_are_rate_limited_by_the_clock_and_the_last_step_is_always_written():
    clock = Clock()
    p = reporter(clock, total=10, seconds=15)
    for step in range(1, 11):
        clock.now = 4.0 * step  # a step every 4 s: written at 4 s, then once 15 s have passed
        p.update(step)
    assert [line.split("  ")[0] for line in lines(p)] == [
        "sft: step 1/10",
        "sft: step 5/10",  # 20 s: 16 s after the first line
        "sft: step 9/10",  # 36 s
        "sft: step 10/10",  # the last step, 4 s later
    ]


def test_close_writes_a_held_back_last_update_once():
    clock = Clock()
    p = reporter(clock, total=None)
    for step in (1, 2, 3):
        clock.now = float(step)
        p.update(step)
    assert len(lines(p)) == 1  # no total: step 3 is not known to be the last
    p.close()
    p.close()
    assert lines(p) == ["sft: step 1/?  elapsed 0m01s", "sft: step 3/?  elapsed 0m03s"]


def test_zero_seconds_writes_every_update():
    clock = Clock()
    p = reporter(clock, total=3, seconds=0)
    for step in (1, 2, 3):
        p.update(step)
    assert len(lines(p)) == 3


def test_a_phase_line_is_written_at_once_after_a_held_back_update():
    clock = Clock()
    p = reporter(clock, total=8, position="batch {step}/{total}")
    clock.now = 1.0
    p.update(1)
    clock.now = 2.0
    p.update(2)
    p.phase("scoring")
    assert [line.split("  ")[0] for line in lines(p)] == [
        "sft: batch 1/8",
        "sft: batch 2/8",
        "sft: scoring",
    ]


def test_eta_counts_only_steps_this_reporter_saw():
    clock = Clock()
    resumed = reporter(clock, total=150)
    clock.now = 10.0
    resumed.update(101)  # resumed at step 100: one step in 10 s, 49 to go
    assert resumed.eta(101, clock.now) == pytest.approx(490.0)

    clock = Clock()
    fresh = reporter(clock, total=20)
    clock.now = 30.0  # an evaluation before training: not a step
    fresh.update(0)
    assert fresh.eta(0, clock.now) is None
    clock.now = 32.0
    fresh.update(1)
    assert fresh.eta(1, clock.now) == pytest.approx(2.0 * 19)
    assert lines(fresh)[0] == "sft: step 0/20  elapsed 0m30s"


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0m00s"), (59.6, "1m00s"), (92, "1m32s"), (3723, "1h02m03s")]
)
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_interval_from_the_environment():
    assert seconds_from_env({}) == 15.0
    assert seconds_from_env({"UPBEAT_PROGRESS_SECONDS": "0"}) == 0.0
    assert seconds_from_env({"UPBEAT_PROGRESS_SECONDS": " 2.5 "}) == 2.5
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(UpbeatError, match="UPBEAT_PROGRESS_SECONDS"):
            seconds_from_env({"UPBEAT_PROGRESS_SECONDS": bad})


def test_a_terminal_gets_the_rich_bar_not_lines():
    clock = Clock()
    stream = TTY()
    with Progress("ppo", 3, stream=stream, seconds=0, clock=clock) as p:
        assert p.tty
        for step in (1, 2, 3):
            p.update(step, {"objective/score": 0.5})
        assert p._bar is not None  # the live display is running
    out = stream.getvalue()
    assert "3/3" in out
    assert "step 1/3" not in out  # no plain lines: a bar redraws in place
    assert p._bar is None


def test_a_pipe_gets_lines():
    assert not Progress("sft", 1, stream=io.StringIO(), seconds=0).tty


def test_a_download_reports_each_chunk(tmp_path):
    remote = tmp_path / "remote.csv"
    remote.write_bytes(b"x" * (2 << 20) + b"tail")
    size = remote.stat().st_size
    calls: list[tuple[int, int | None]] = []
    local = fetch_sentiment140(
        tmp_path / "local.csv", remote.as_uri(), None, on_download=lambda *a: calls.append(a)
    )
    assert local.read_bytes() == remote.read_bytes()
    assert calls == [(1 << 20, size), (2 << 20, size), (size, size)]
