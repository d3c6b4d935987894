"""Synthetic DICOM files from the committed demo PNGs: python -m scripts.make_dicom_samples [NAME ...].

With no names it writes the committed sample, samples/chest_left_effusion.dcm.

Every header value that would be PHI in a real file is a made-up marker; the pixels
are the demo generator's. A chest sample becomes a 12-bit CT-style slice (stored
value 16 x grey level, Rescale Intercept -1024) whose file window renders exactly
the PNG's grey levels; a colour sample becomes 8-bit RGB. `dicom_file` is also
what the tests build their files with.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
# Made-up identity, so a test can prove these values never leave the decoder.
PHI = {
    "PatientName": "SYNTHETIC^CANARY",
    "PatientID": "CANARY-ID-0001",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "CANARY-ACC-77",
    "InstitutionName": "Canary General Hospital",
    "ReferringPhysicianName": "CANARY^REFERRER",
    "StudyDescription": "CANARY STUDY DESCRIPTION",
}


def dicom_file(pixels: np.ndarray, transfer_syntax: str = ExplicitVRLittleEndian, **header) -> bytes:
    """A Part-10 file holding `pixels` ([H, W] grey, [H, W, 3] RGB or [F, H, W(, 3)] frames)
    with the PHI markers and `header` (keyword=value) set; pixel attributes follow the array
    unless `header` overrides them. Compressed syntaxes (RLE, JPEG 2000) are encoded with pydicom."""
    pixels = np.asarray(pixels)
    colour = pixels.shape[-1] == 3 and pixels.ndim in (3, 4)
    frames = pixels.shape[0] if pixels.ndim == (4 if colour else 3) else 1
    rows, columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    bits = 8 if pixels.dtype.itemsize == 1 else 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = header.get("SOPClassUID", SecondaryCaptureImageStorage)
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()  # UIDs derived from the pixels: reproducible files
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[digest, "instance"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[digest, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[digest, "series"])
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.Modality = "OT"
    ds.Rows, ds.Columns = int(rows), int(columns)
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    if transfer_syntax in (DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian):
        meta.TransferSyntaxUID = transfer_syntax
    elif transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, encoding_plugin="pylibjpeg" if "1.2.840.10008.1.2.4" in transfer_syntax else "")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def sample_dicom(png: Path) -> bytes:
    """The DICOM form of one committed sample PNG."""
    img = Image.open(png)
    if img.mode == "L":
        grey = np.asarray(img, dtype=np.uint16)  # [H, W], 0..255
        # 12 bits stored; HU = 16 * grey - 1024. The window maps HU -1024..3056 back to 0..255:
        # LINEAR with centre c and width w is (HU - (c - 0.5)) / (w - 1) + 0.5.
        return dicom_file(
            grey * 16, Modality="CT", BitsStored=12, HighBit=11, RescaleIntercept=-1024, RescaleSlope=1,
            RescaleType="HU", WindowCenter="1016.5", WindowWidth="4081",
        )
    return dicom_file(np.asarray(img.convert("RGB")), Modality="XC")


def main() -> int:
    for name in sys.argv[1:] or ["chest_left_effusion"]:
        png = SAMPLES / f"{name}.png"
        out = png.with_suffix(".dcm")
        out.write_bytes(sample_dicom(png))
        print(out.relative_to(SAMPLES.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
