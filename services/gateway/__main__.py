"""Run the gateway: python -m services.gateway --help."""

from services.gateway.app import GatewayApp
from services.plumbing.server import main
from services.plumbing.settings import GATEWAY

if __name__ == "__main__":
    main(GATEWAY, GatewayApp)
