"""nginx serving a scratch directory over HTTP, for the project's HTTP image store.

nginx answers range requests natively and ``autoindex_format json`` gives a listing a program
can read. Its config, pid file, logs and temp paths all live in the scratch dir; ``daemon off``
keeps the master our child (see common.Daemon), ``user root`` (as root) lets the worker read
the 0700 scratch dir.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tests.backends.common import (
    HOST,
    Backend,
    free_ports,
    http_status,
    require,
    tail_logs,
    wait_until,
)

PACKAGES = "nginx-light"


@dataclass
class NginxInfo:
    """The ``nginx`` fixture value: files written under ``root`` are served at ``url``."""

    dir: Path
    url: str
    root: Path

    def log_tail(self, lines: int = 30) -> str:
        """Tail of nginx's error log, to attach to a failure message."""
        return tail_logs(self.dir / "log", lines)


class NginxServer(Backend):
    """One nginx master + one worker on a free port of 127.0.0.1."""

    name = "nginx"
    packages = PACKAGES

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.root = directory / "root"
        self.port = 0

    def _conf_text(self) -> str:
        d = self.dir
        user = "user root;\n" if os.getuid() == 0 else ""
        temps = "".join(
            f"    {kind}_temp_path {d}/tmp/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""{user}daemon off;
worker_processes 1;
pid {d}/run/nginx.pid;
error_log {d}/log/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/log/access.log;
{temps}    default_type application/octet-stream;
    sendfile on;
    server {{
        listen {HOST}:{self.port};
        root {self.root};
        location / {{
            autoindex on;
            autoindex_format json;
        }}
    }}
}}
"""

    def _start(self) -> None:
        require(["nginx"], PACKAGES)
        (self.port,) = free_ports(1)
        for sub in ("run", "tmp", "root"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(self._conf_text())
        # -e: error log before the config is read; -p: prefix for any relative path
        master = self.spawn(
            "nginx",
            ["nginx", "-p", self.dir, "-e", self.dir / "log" / "error.log", "-c", conf],
        )
        wait_until(lambda: http_status(self.info.url) == 200, "nginx to answer", [master])

    def ready(self, name: str, timeout: float) -> None:
        """After a restart: nginx answers again (see Backend.restart)."""
        wait_until(lambda: http_status(self.info.url) == 200, "nginx to answer",
                   [self.daemon(name)], timeout=timeout)

    @property
    def info(self) -> NginxInfo:
        return NginxInfo(dir=self.dir, url=f"http://{HOST}:{self.port}/", root=self.root)

    def env(self) -> dict[str, str]:
        return {"NGINX_URL": self.info.url, "NGINX_ROOT": str(self.root)}
