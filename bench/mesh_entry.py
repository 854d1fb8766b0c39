"""Entry point the benchmark uses to run the mesh: `services.mesh` unchanged, optionally profiled.

With MLMESH_BENCH_CPROFILE=<path> set, SIGUSR1 starts cProfile on the main thread (the asyncio
loop, where all of the mesh's Python work runs) and SIGUSR2 stops it and writes the stats to
<path>. So the harness profiles exactly one load window and the rest of the run is unaffected.
This switch lives here, in bench code, not in services/.
"""

from __future__ import annotations

import cProfile
import os
import signal
from pathlib import Path

from services import mesh

PROFILE_ENV = "MLMESH_BENCH_CPROFILE"


def _install_profiler(path: Path) -> None:
    profiler = cProfile.Profile()

    def start(_signum: int, _frame: object) -> None:
        profiler.enable()

    def stop(_signum: int, _frame: object) -> None:
        profiler.disable()
        partial = path.with_name(f".{path.name}.partial")
        profiler.dump_stats(str(partial))
        os.replace(partial, path)  # the harness waits for the complete file

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def main() -> None:
    profile_path = os.environ.get(PROFILE_ENV, "")
    if profile_path:
        _install_profiler(Path(profile_path))
    mesh.main()


if __name__ == "__main__":
    main()
