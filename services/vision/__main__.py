"""Run the vision encoder: python -m services.vision --help."""

from services.plumbing.server import main
from services.plumbing.settings import VISION
from services.vision.servicer import VisionApp

if __name__ == "__main__":
    main(VISION, VisionApp)
