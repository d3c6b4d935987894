"""Run the vision encoder: python -m services.vision --help."""

from services.common.server import main
from services.common.settings import VISION
from services.vision.servicer import VisionApp

if __name__ == "__main__":
    main(VISION, VisionApp)
