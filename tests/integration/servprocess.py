"""A real `mtrkmta serve` process whose output a test reads line by line (service tests)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from mtrkmtaprocess import mtrkmta_env

TIMEOUT = 30.0
LISTENING = re.compile(r"smtp listening on 127\.0\.0\.1:(\d+)")


class ServeProcess:
    """``mtrkmta serve ARGS``; a thread hands each line of its output to :meth:`wait_for`."""

    def __init__(self, args: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.proc = subprocess.Popen(
            # No HTTP listener unless asked for (--http in ARGS wins): one port less to share.
            [sys.executable, "-m", "mtrkmta.cli.main", "serve", "--http", "none", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**mtrkmta_env(), **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # the process closed its output

    def wait_for(self, pattern: str | re.Pattern[str]) -> re.Match[str]:
        """The first line from now on that matches ``pattern`` (its match)."""
        expected = re.compile(pattern) if isinstance(pattern, str) else pattern
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {expected.pattern!r}:\n{self.output()}"
                ) from None
            if line is None:
                raise AssertionError(f"process ended before {expected.pattern!r}:\n{self.output()}")
            self.seen.append(line)
            found = expected.search(line)
            if found:
                return found

    def port(self) -> int:
        """The SMTP listener's port, from its start-up line."""
        return int(self.wait_for(LISTENING).group(1))

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def output(self) -> str:
        return "\n".join(self.seen)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(TIMEOUT)  # it has read to the end of the output
        if self.proc.stdout is not None:
            self.proc.stdout.close()
