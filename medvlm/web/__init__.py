"""The medvlm web page: drop an image, see what the model thinks. A small FastAPI app between the
browser and the gateway (browsers cannot speak native gRPC), calling it through medvlm.client.

    python -m medvlm.web --target 127.0.0.1:50050      # then open http://127.0.0.1:8050/
"""

from medvlm.web.app import WebSettings, create_app

__all__ = ["WebSettings", "create_app"]
