"""Logging set-up for the `ercflow` command line.

The level comes from `-q` (WARNING) / `-v` (DEBUG) when given, else from the environment variable
`ERCFLOW_LOG_LEVEL` (a name such as `DEBUG`, or a number), else INFO. It applies to ercflow's own packages;
other libraries log at that level too but never below INFO (their debug output is noise here).
"""
from __future__ import annotations

import logging
import os
import sys

ENV = "ERCFLOW_LOG_LEVEL"
FORMAT = "%(levelname)s %(name)s: %(message)s"
PACKAGES = ("ercflow", "pipeline", "heads", "stages")


def log_level(level: str | int | None = None) -> int:
    """`level` (a name or a number), else `$ERCFLOW_LOG_LEVEL`, else INFO, as a logging level number."""
    if level is None:
        level = os.environ.get(ENV) or logging.INFO
    if isinstance(level, str):
        name = level.strip().upper()
        if name.lstrip("-").isdigit():
            return int(name)
        value = logging.getLevelName(name)
        if not isinstance(value, int):
            raise ValueError(f"unknown log level {level!r} (DEBUG, INFO, WARNING, ERROR or a number)")
        return value
    return int(level)


def setup_logging(level: str | int | None = None) -> int:
    """Log to stderr, one line per record, at `log_level(level)`; returns the level."""
    value = log_level(level)
    logging.basicConfig(format=FORMAT)
    logging.getLogger().setLevel(max(value, logging.INFO))
    for name in PACKAGES:
        logging.getLogger(name).setLevel(value)
    return value


def quiet_libraries(level: int) -> None:
    """transformers / huggingface_hub print weight-loading and shard-writing bars and notices of their own:
    they follow ercflow's level (shown only with -v)."""
    verbose = level <= logging.DEBUG
    transformers = sys.modules.get("transformers")
    if transformers is None:
        # not imported yet (a stage that loads no model never imports it: ~0.7 s saved): transformers reads its
        # level from this variable when imported, and its bars follow huggingface_hub's, set below
        os.environ["TRANSFORMERS_VERBOSITY"] = "info" if verbose else "error"
    else:
        transformers.utils.logging.set_verbosity(logging.INFO if verbose else logging.ERROR)
        if verbose:
            transformers.utils.logging.enable_progress_bar()
        else:
            transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if level <= logging.DEBUG else disable_progress_bars)()
    except ImportError:
        pass


def progress_enabled() -> bool:
    """tqdm bars only for a person watching: not in CI, not when stderr is a file or pipe, and `TQDM_DISABLE`
    (tqdm's own switch) is honoured too."""
    if os.environ.get("CI") or os.environ.get("TQDM_DISABLE", "").strip() not in ("", "0", "false", "False"):
        return False
    return sys.stderr.isatty()


def progress(**kwargs):
    """A tqdm bar (on stderr) that `progress_enabled` switches off."""
    from tqdm import tqdm

    return tqdm(disable=not progress_enabled(), **kwargs)


def run_stage(main) -> None:
    """Entry point of a stage script: logging from `$ERCFLOW_LOG_LEVEL`, quiet libraries, and a user's
    mistake or a damaged file reported as one `error:` line (exit 1) instead of a traceback."""
    level = setup_logging()
    quiet_libraries(level)
    from pipeline import UserError

    try:
        main()
    except UserError as e:
        logging.getLogger("stages").debug("traceback", exc_info=True)
        sys.exit(f"error: {e}")
