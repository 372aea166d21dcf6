"""Progress of the chained loop: a bar for people, one log line per iteration for schedulers.

``impute(progress=...)`` takes

* ``"auto"`` (default): a bar when standard error is a terminal or the code runs in a
  notebook, else log lines;
* ``"bar"``: a bar (tqdm; it adapts to notebooks) with the iteration, the variable being
  visited, the elapsed time and an estimate of the time remaining;
* ``"log"``: one line per iteration on the ``dmice`` logger, in ``key=value`` form so log
  collectors can parse it: ``iteration=3/10 seconds=1.84 max_rhat=1.071``;
* ``False`` / ``None``: nothing;
* a callable ``f(iteration, total, seconds)``, called after each iteration.

Log lines name iterations and columns only, never data values.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dmice")

MODES = ("auto", "bar", "log")


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def check(progress: Any) -> Any:
    """Validate the ``progress`` argument of :func:`dmice.impute`."""
    if progress is None or progress is False or callable(progress) or progress in MODES:
        return progress
    from dmice.errors import InputError

    raise InputError(f"progress must be one of {list(MODES)}, False or a callable "
                     f"(iteration, total, seconds), got {progress!r}")


class Reporter:
    """Receives every visit and iteration of a run and reports them as configured.

    Parameters
    ----------
    progress : see the module docstring
    total : int
        Iterations this call will run at most.
    start : int
        Iterations already run before this call.
    visits_per_iteration : int
    max_rhat : callable, optional
        Returns the current largest R-hat (NaN when not available); evaluated once per
        iteration for the log line and the bar.
    dashboard : str, optional
        Link of the distributed dashboard, shown once at the start.
    """

    def __init__(self, progress: Any, *, total: int, start: int, visits_per_iteration: int,
                 max_rhat: Callable[[], float] | None = None, dashboard: str | None = None):
        self.total = total
        self.start = start
        self.visits = visits_per_iteration
        self.max_rhat = max_rhat
        self.callback = progress if callable(progress) else None
        mode = progress if isinstance(progress, str) else None
        if mode == "auto":
            mode = "bar" if (_isatty() or _in_notebook()) else "log"
        self.bar = None
        self.log_lines = mode == "log"
        if dashboard:
            log.info("dashboard=%s", dashboard)
        if mode == "bar" and total > 0:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # no tqdm: fall back to log lines
                self.log_lines = True
            else:
                self.bar = tqdm(total=total * visits_per_iteration, unit="visit", leave=True,
                                desc="dmice", dynamic_ncols=True)
                if dashboard:
                    self.bar.write(f"dmice: dashboard at {dashboard}")

    def visit(self, iteration: int, variable: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"iteration {iteration}/{self.start + self.total} {variable}",
                                         refresh=False)
            self.bar.update(1)

    def iteration(self, iteration: int, seconds: float) -> None:
        rh = self.max_rhat() if (self.max_rhat is not None and (self.log_lines or self.bar)) else math.nan
        if self.bar is not None and not math.isnan(rh):
            self.bar.set_postfix_str(f"max R-hat {rh:.3f}", refresh=True)
        if self.log_lines:
            log.info("iteration=%d/%d seconds=%.2f max_rhat=%s", iteration,
                     self.start + self.total, seconds, "nan" if math.isnan(rh) else f"{rh:.3f}")
        if self.callback is not None:
            self.callback(iteration, self.start + self.total, seconds)

    def rewind(self, iteration: int) -> None:
        """The chains went back to ``iteration`` (replayed after a lost worker)."""
        if self.bar is not None:
            self.bar.n = max(0, iteration - self.start) * self.visits
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
