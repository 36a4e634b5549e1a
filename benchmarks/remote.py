"""Run a benchmark case in its own process and drive it step by step, so cases can be interleaved.

Every training contender lives in a separate process (its own memory peak, its own DataLoader
workers, no shared oneDNN caches) but they take turns: the parent sends ``epoch`` to A, waits,
then to B, and so on. Idle contenders sleep on a pipe and use no CPU, so each measured epoch runs
under the same conditions apart from the load from other users of the machine.

Protocol: one JSON object per line. The parent writes ``{"cmd": name}`` on the child's stdin; the
child answers one line ``BENCH {...}`` on its original stdout; anything libraries print goes to
stderr (a log file). ``Local`` offers the same ``call`` API in this process (smoke tests).

Example:
    >>> case = Remote("benchmarks.train_bench", {"name": "peer_a", ...}, log_dir)
    >>> case.call("setup"); case.call("epoch"); case.close()
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import REPO

_PREFIX = "BENCH "


class Remote:
    """A case object living in a child process ``python -m <module> serve <spec-json>``."""

    def __init__(self, module: str, spec: dict, log_dir: Path):
        self.name = spec.get("name", module)
        self.log_path = Path(log_dir) / f"{self.name}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen([sys.executable, "-m", module, "serve", json.dumps(spec)], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.pid = self.proc.pid

    def call(self, cmd: str) -> dict[str, Any]:
        """Send one command; return the child's answer (raises with the child's traceback on error)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_PREFIX):
                answer = json.loads(line[len(_PREFIX):])
                if "error" in answer:
                    raise RuntimeError(f"{self.name}: {cmd} failed in the child:\n{answer['error']}")
                return answer
        raise RuntimeError(f"{self.name}: the child exited during {cmd!r} (exit code {self.proc.wait()}); "
                           f"see {self.log_path}:\n{self._tail()}")

    def _tail(self, n: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Local:
    """The same ``call`` API on an object in this process (no isolation: for smoke tests)."""

    def __init__(self, obj: Any):
        self.obj, self.name, self.pid = obj, getattr(obj, "name", type(obj).__name__), os.getpid()

    def call(self, cmd: str) -> dict[str, Any]:
        return getattr(self.obj, cmd)()

    def close(self) -> None:
        pass


def serve(factory: Callable[[dict], Any], spec_json: str) -> None:
    """The child's loop: build the case from its spec, answer commands until ``quit`` or EOF."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to the log, never into the protocol
    sys.stdout = sys.stderr
    obj = None
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        if cmd == "quit":
            break
        try:
            if obj is None:
                obj = factory(json.loads(spec_json))
            answer = getattr(obj, cmd)()
        except Exception:  # report, keep serving: the parent decides what to do
            answer = {"error": traceback.format_exc()}
        proto.write(_PREFIX + json.dumps(answer) + "\n")
    proto.close()
