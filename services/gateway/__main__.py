"""Run the gateway: python -m services.gateway --help."""

from services.common.server import main
from services.common.settings import GATEWAY
from services.gateway.app import GatewayApp

if __name__ == "__main__":
    main(GATEWAY, GatewayApp)
