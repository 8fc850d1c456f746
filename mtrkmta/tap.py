"""What the twistd plugin runs: option parsing with config validation, then the service."""

from __future__ import annotations

import sys

from mtrkmta.cli.options import ServeOptions
from mtrkmta.config import EXIT_CONFIG_ERROR, Config, ConfigError
from mtrkmta.service import MTAService, make_service


class Options(ServeOptions):
    """``twistd mtrkmta`` options; a bad configuration stops here with status 2."""

    config: Config

    def postOptions(self) -> None:
        try:
            self.config = self.load_config()
        except ConfigError as error:
            print(f"mtrkmta: {error}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG_ERROR) from None


def makeService(options: Options) -> MTAService:
    return make_service(options.config)
