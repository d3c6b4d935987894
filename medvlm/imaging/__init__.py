"""Images as the model sees them: decoding (PNG, JPEG, DICOM), display windows, open_clip's
preprocessing and the crop geometry back to the original image. Used by the vision encoder, the
web page, the benchmark and the bundle manifest; imports nothing of the services.

    medvlm.imaging.preprocess  decode(), decode_image(), preprocess(), ImageOptions, configure_pillow()
    medvlm.imaging.dicom       DICOM Part-10 files: header checks before pixels, modality and VOI LUT
    medvlm.imaging.window      Window, WindowRequest, PRESETS, to_eight_bit()
    medvlm.imaging.geometry    crop_box(): where the model's square input lies in the original image
    medvlm.imaging.spec        ImageSpec, a bundle's preprocessing (read by engines.runtime.manifest)
    medvlm.imaging.limits      DecodeLimits, check_image_bytes()
    medvlm.imaging.errors      InvalidImage, every refusal, its message safe to show a caller

Nothing is imported here: the manifest reads spec.py alone, without Pillow or pydicom.
"""
