"""The gateway with a deliberate leak, for the soak's control run (make soak LEAK=1): every
Classify request, stream items too, is kept in memory for the life of the process, so the soak's
leak detector must fail the run. The serving path carries no switch for it: this module hands the
stock start-up a GatewayApp whose servicer retains, and only bench.soak starts it.

python -m bench.leaky_gateway takes the gateway's flags and MEDVLM_* variables."""

from __future__ import annotations

from services.gateway.app import GatewayApp
from services.gateway.servicer import GatewayServicer
from services.plumbing.server import main
from services.plumbing.settings import GATEWAY


class RetainingServicer(GatewayServicer):
    """The gateway's servicer, keeping every request it classifies in its app's `retained`."""

    async def classify_one(self, request, question, context):
        self.app.retained.append(request)
        return await super().classify_one(request, question, context)


class LeakyGatewayApp(GatewayApp):
    servicer = RetainingServicer

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.retained: list = []


if __name__ == "__main__":
    main(GATEWAY, LeakyGatewayApp)
