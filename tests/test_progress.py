"""Progress lines of a pipeline stage (irnet_ray.pipeline.progress), on a hand-driven clock."""

from __future__ import annotations

import logging

from irnet_ray.pipeline.progress import Progress, quiet_ray_data


def test_lines_come_at_most_every_interval_with_rate_and_eta():
    now = [100.0]
    lines: list[str] = []
    progress = Progress("labeling", 1000, lines.append, interval=10.0, clock=lambda: now[0])
    now[0] = 105.0
    progress.add(50)
    assert lines == []  # not yet 10 s
    now[0] = 110.0
    progress.add(50)  # 100 done in 10 s: 10 images/s, 900 left: 90 s
    assert lines == ["labeling: 100/1000 images (10%), 10.00 images/s, 10s elapsed, ETA 1m30s"]
    now[0] = 115.0
    progress.add(100)
    assert len(lines) == 1
    now[0] = 3710.0
    progress.add(800)
    progress.close()
    assert lines[-2] == "labeling: 1000/1000 images (100%), 0.28 images/s, 1h00m10s elapsed"
    assert lines[-1] == lines[-2]  # close() always says where it ended


def test_a_stage_with_nothing_known_reports_counts_only():
    lines: list[str] = []
    progress = Progress("mining", 0, lines.append, clock=lambda: 1.0)
    progress.close()
    assert lines == ["mining: 0/0 images, 0.00 images/s, 0s elapsed"]


def test_ray_data_is_quiet_unless_verbose():
    import ray.data

    context = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    before = (context.enable_progress_bars, logger.level)
    try:
        context.enable_progress_bars, logger.level = True, logging.INFO
        quiet_ray_data(verbose=True)
        assert context.enable_progress_bars and logger.level == logging.INFO
        quiet_ray_data()
        assert not context.enable_progress_bars and logger.level == logging.WARNING
    finally:
        context.enable_progress_bars, logger.level = before
