"""The build backend of `pip install ./python`: maturin's, saying on the terminal that it compiles and for how long.

pip shows a build backend's output only with `-v`, so a first install would sit for minutes behind a spinner while
cargo compiles the Rust engine. This wrapper writes one line before compiling (what, and roughly how long it takes)
and one after (how long it took) to the terminal (`/dev/tty`) when there is one, and to standard error otherwise
(shown by `pip install -v` and in a failed build's log). Every hook is maturin's own; only the two that compile are
wrapped. The build goes into the repository's `target/` (`.cargo/config.toml`), where `cargo build` and the tests
build too, so a later install compiles only what changed.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping, Optional

from maturin import (  # noqa: F401  (re-exported: the PEP 517 hooks this backend does not change)
    build_editable as _maturin_build_editable,
    build_sdist,
    build_wheel as _maturin_build_wheel,
    get_maturin_pep517_args,
    get_requires_for_build_editable,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_wheel,
)

# Measured on the project's 2-core development machine (README, "From Python"): 4 min 10 s when issue 20 was filed,
# still compiling after 30 minutes while other builds kept both cores busy.
FIRST_BUILD = "about 4 minutes on 2 cores, far longer on a busy machine,"


def _tell(message: str) -> None:
    # On a line of its own: pip's spinner has written "Building wheel ... " without a newline.
    line = f"\nagent-connection-manager: {message}\n"
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line)
            return
    except OSError:
        pass
    sys.stderr.write(line)
    sys.stderr.flush()


def _profile(config_settings: Optional[Mapping[str, Any]]) -> str:
    args = get_maturin_pep517_args(config_settings)
    for i, arg in enumerate(args):
        if arg == "--profile" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--profile="):
            return arg.split("=", 1)[1]
    return "release"


def _compiling(build, wheel_directory, config_settings, metadata_directory) -> str:
    _tell(
        f"compiling the Rust engine with cargo ({_profile(config_settings)} profile) into the repository's target/: "
        f"{FIRST_BUILD} for a first build, then only what changed (pip install -v shows cargo's output)"
    )
    started = time.monotonic()
    name = build(wheel_directory, config_settings, metadata_directory)
    _tell(f"compiled and packaged in {time.monotonic() - started:.0f} s")
    return name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None) -> str:
    """maturin's `build_wheel`, announced on the terminal."""
    return _compiling(_maturin_build_wheel, wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None) -> str:
    """maturin's `build_editable`, announced on the terminal."""
    return _compiling(_maturin_build_editable, wheel_directory, config_settings, metadata_directory)


__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_wheel",
]
