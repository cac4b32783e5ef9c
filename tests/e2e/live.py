"""What the e2e helper servers share: the address they listen on, the start/stop life cycle,
and the registry of servers still running.

    HOST       every helper server (servers.py and the fakes package) listens on it only
    Server     start()/stop(), `running` and the context-manager protocol; subclasses
               implement _start/_stop. start() returns self once the server is up; stop() is
               idempotent. A failing _start is cleaned up by _stop before the error propagates.
    stop_all() stops every server started and not yet stopped; also run at interpreter exit,
               as a safety net for a test that forgot to.
"""
import atexit
import threading

HOST = "127.0.0.1"

_LIVE = set()
_LIVE_LOCK = threading.Lock()


def _register(server):
    with _LIVE_LOCK:
        _LIVE.add(server)


def _unregister(server):
    with _LIVE_LOCK:
        _LIVE.discard(server)


@atexit.register
def stop_all():
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for s in servers:
        try:
            s.stop()
        except Exception:
            pass


class Server:
    """start()/stop() plus the context-manager protocol. Subclasses implement _start/_stop;
    a failing _start is cleaned up by _stop before the error propagates."""

    _running = False

    def start(self):
        if self._running:
            return self
        try:
            self._start()
        except BaseException:
            try:
                self._stop()
            except Exception:
                pass
            raise
        self._running = True
        _register(self)
        return self

    def stop(self):
        try:
            self._stop()
        finally:
            self._running = False
            _unregister(self)

    @property
    def running(self):
        return self._running

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def _start(self):
        raise NotImplementedError

    def _stop(self):
        raise NotImplementedError
